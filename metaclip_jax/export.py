"""Export a checkpoint: params-only, open_clip state dict, or serialized ``jax.export`` encoders.

    python -m metaclip_jax.export --checkpoint DIR|FILE --format params|open_clip|jax_export \\
        --output PATH [--dtype float32|bfloat16] [--model PRESET] [--quickgelu|--no-quickgelu]
        [--compute-dtype float32|bfloat16] [--bake-params|--pass-params] [--platforms cpu,cuda,tpu]

``--checkpoint`` is anything ``checkpoint_io.load_params`` accepts: a params-only folder, a training
workdir / step folder, an open_clip / MetaCLIP ``.pt`` / ``.bin`` / ``.safetensors`` file or an
open_clip folder. Importing a released MetaCLIP file is ``--format params`` on the ``.pt``. Every
output folder is written to a temporary name and renamed when complete. See ``docs/export.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from metaclip_jax import checkpoint_io as cio
from metaclip_jax import open_clip_interop as oc
from metaclip_jax.models.towers import OPENAI_MEAN, OPENAI_STD

FORMATS = ("params", "open_clip", "jax_export")
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
OPEN_CLIP_CONFIG = "open_clip_config.json"
IMAGE_FN = "image_encoder.jaxexport"
TEXT_FN = "text_encoder.jaxexport"
EXPORT_SPEC = "export_spec.json"
EXPORT_PARAMS = "params.npz"
BAKE_LIMIT_BYTES = 1 << 30   # bake parameters into the exported functions below 1 GB (auto mode)
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"


# ------------------------------------------------------------------------------------------ open_clip


def open_clip_preprocess_cfg(cfg: Any) -> dict[str, Any]:
    """``preprocess_cfg`` as open_clip's ``push_to_hf_hub`` writes it (plus the image size)."""
    return {"size": cfg.vision.image_size, "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD),
            "interpolation": "bicubic", "resize_mode": "shortest"}


def export_open_clip(loaded: cio.LoadedModel, out: str | Path, *, overwrite: bool = False) -> Path:
    """``out/open_clip_model.safetensors`` + ``out/open_clip_config.json`` (``{"model_cfg",
    "preprocess_cfg"}``; ``model_cfg.quick_gelu`` carries the activation). Loads in open_clip with
    ``open_clip.create_model("local-dir:OUT")`` or ``open_clip.CLIP(**model_cfg)`` + strict load."""
    from safetensors.numpy import save_file

    if loaded.model_type != "clip":
        raise ValueError(f"open_clip has no {loaded.model_type!r} model, so the open_clip format is only "
                         "for CLIP checkpoints; export Llip with --format params or --format jax_export")
    params = cio.cast_params(loaded.params, "float32")
    sd = oc.params_to_open_clip(params, loaded.config)
    model_cfg = oc.open_clip_model_config(loaded.config)
    if loaded.config.init_logit_bias is not None:      # SigLIP-style CLIP: open_clip's logit_bias
        model_cfg["init_logit_bias"] = loaded.config.init_logit_bias
    config = {"model_cfg": model_cfg,
              "preprocess_cfg": open_clip_preprocess_cfg(loaded.config)}
    tmp = cio.staging_dir(out)
    try:
        save_file({k: np.array(v, order="C") for k, v in sd.items()}, str(tmp / OPEN_CLIP_WEIGHTS),
                  metadata={"format": "pt"})
        with open(tmp / OPEN_CLIP_CONFIG, "w") as f:
            json.dump(config, f, indent=2)
        return cio.publish_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------- jax_export


PAIR_FN = "pair_logits.jaxexport"


def _encoder_fns(loaded: cio.LoadedModel) -> tuple[Any, dict[str, Callable]]:
    """(param state, {"image": f(state, images), "text": f(state, tokens)[, "pair": f(state, ...)]}).

    CLIP: ``encode_image`` / ``encode_text`` features. Llip: ``encode_image_tokens`` -> (kmat, vmat),
    ``encode_text_query`` -> (q, zt) and ``pair_logits(kmat, vmat, q, zt)`` -> [b, c] logits."""
    from flax import nnx

    graphdef, state = nnx.split(cio.build_model(loaded))
    m = lambda s: nnx.merge(graphdef, s)
    if loaded.model_type == "clip":
        return state, {"image": lambda s, x: m(s).encode_image(x), "text": lambda s, x: m(s).encode_text(x)}
    return state, {"image": lambda s, x: m(s).encode_image_tokens(x),
                   "text": lambda s, x: m(s).encode_text_query(x),
                   "pair": lambda s, kmat, vmat, q, zt: m(s).pair_logits(kmat, vmat, q, zt)}


def _input_specs(loaded: cio.LoadedModel) -> dict[str, tuple[Any, ...]]:
    import jax
    import jax.numpy as jnp

    cfg = loaded.config
    b, c = jax.export.symbolic_shape("b, c")
    S, T = cfg.vision.image_size, cfg.text.context_length
    specs: dict[str, tuple[Any, ...]] = {
        "image": (jax.ShapeDtypeStruct((b, S, S, 3), jnp.uint8),),
        "text": (jax.ShapeDtypeStruct((b, T), jnp.int32),),
    }
    if loaded.model_type == "llip":
        H, K, D = cfg.num_heads, cfg.num_tokens, cfg.embed_dim
        f32 = jnp.float32
        kv = jax.ShapeDtypeStruct((b, H, K, D // H), f32)
        specs["pair"] = (kv, kv, jax.ShapeDtypeStruct((c, H, D // H), f32), jax.ShapeDtypeStruct((c, D), f32))
    return specs


def export_encoders(loaded: cio.LoadedModel, *, bake_params: bool = True,
                    platforms: Sequence[str] | None = None
                    ) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    """``jax.export.Exported`` functions with a symbolic batch dimension ``b``, by name.

    ``"image"``: ``uint8 [b, S, S, 3]`` RGB (resized + centre-cropped; normalisation happens inside).
    ``"text"``: ``int32 [b, context_length]`` CLIP BPE ids. CLIP outputs float32 ``[b, embed_dim]``
    features, not L2-normalised; Llip outputs ``(kmat, vmat)`` / ``(q, zt)`` and adds ``"pair"``
    (``[b, c]`` logits). With ``bake_params`` the parameters are constants of the functions; otherwise
    each takes a flat ``{"visual/...": array}`` dict as first argument (returned here).
    """
    import jax
    from flax import nnx

    state, fns = _encoder_fns(loaded)
    specs = _input_specs(loaded)
    kw = {"platforms": tuple(platforms)} if platforms else {}
    if bake_params:
        def bind(fn: Callable) -> Callable:
            return lambda *x: fn(state, *x)

        return {n: jax.export.export(jax.jit(bind(f)), **kw)(*specs[n]) for n, f in fns.items()}, None

    flat = {k: np.asarray(v, np.float32) for k, v in cio.flatten_params(loaded.params).items()}

    def with_params(fn: Callable) -> Callable:
        def run(flat_params: dict[str, Any], *x: Any) -> Any:
            st = jax.tree.map(lambda v: v, state)  # a copy of the template State, then fill it
            nnx.replace_by_pure_dict(st, cio.unflatten_params(flat_params))
            return fn(st, *x)
        return run

    p_spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat.items()}
    return {n: jax.export.export(jax.jit(with_params(f)), **kw)(p_spec, *specs[n])
            for n, f in fns.items()}, flat


def export_spec(loaded: cio.LoadedModel, *, bake_params: bool, platforms: Sequence[str]) -> dict[str, Any]:
    """The ``export_spec.json`` describing the inputs of the exported encoders."""
    import jax

    cfg = loaded.config
    logit_scale = float(np.exp(np.asarray(loaded.params["logit_scale"], np.float32)))
    if loaded.model_type == "clip":
        outputs: Any = "image / text: float32 [b, embed_dim] features, not L2-normalised"
    else:
        outputs = {"image": "(kmat, vmat) float32 [b, H, K, D/H] each",
                   "text": "(q [b, H, D/H], zt [b, D] L2-normalised)",
                   "pair": f"{PAIR_FN}: (kmat, vmat [b, ...], q, zt [c, ...]) -> logits [b, c] "
                           "= exp(logit_scale) * cos + logit_bias (sigmoid -> match probability)"}
    spec = {
        "format": "jax_export",
        "model_type": loaded.model_type,
        "jax_version": jax.__version__,
        "platforms": list(platforms),
        "params": "baked" if bake_params else EXPORT_PARAMS,
        "embed_dim": cfg.embed_dim,
        "logit_scale": logit_scale,
        "outputs": outputs,
        "image": {
            "file": IMAGE_FN, "shape": ["b", cfg.vision.image_size, cfg.vision.image_size, 3],
            "dtype": "uint8", "layout": "NHWC RGB", "image_size": cfg.vision.image_size,
            "resize": "shortest side to image_size (bicubic), then centre crop",
            "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD),
            "normalization": "inside the function: (x / 255 - mean) / std",
        },
        "text": {
            "file": TEXT_FN, "shape": ["b", cfg.text.context_length], "dtype": "int32",
            "context_length": cfg.text.context_length,
            "tokenizer": ("clip_bpe (open_clip ViT-B-32 SimpleTokenizer, lowercase)"
                          if cfg.text.vocab_size == 49408
                          else f"not CLIP BPE (vocab {cfg.text.vocab_size}: XLM-V, facebook/xlm-v-base)"),
            "vocab_file": VOCAB_FILE, "sot_id": 49406, "eot_id": 49407, "pad_id": 0, "truncate": "eot",
            "pool": cfg.text.pool,
        },
        "model_config": cfg.to_dict(),
    }
    if loaded.model_type == "llip":
        spec["pair"] = {"file": PAIR_FN, "num_heads": cfg.num_heads, "num_tokens": cfg.num_tokens,
                        "tau": cfg.tau}
    return spec


def export_jax(loaded: cio.LoadedModel, out: str | Path, *, bake_params: bool | None = None,
               platforms: Sequence[str] | None = None, overwrite: bool = False) -> Path:
    """Write ``image_encoder.jaxexport``, ``text_encoder.jaxexport``, ``export_spec.json``, the BPE
    vocabulary, and ``params.npz`` when parameters are passed rather than baked in.

    ``bake_params=None`` bakes models under 1 GB of float32 parameters."""
    import jax

    from metaclip_jax.tokenizer import VOCAB_PATH

    if bake_params is None:
        bake_params = loaded.num_params * 4 < BAKE_LIMIT_BYTES
    platforms = list(platforms) if platforms else sorted({jax.default_backend(), "cpu"})
    exported, flat = export_encoders(loaded, bake_params=bake_params, platforms=platforms)
    files = {"image": IMAGE_FN, "text": TEXT_FN, "pair": PAIR_FN}
    tmp = cio.staging_dir(out)
    try:
        for name, exp in exported.items():
            (tmp / files[name]).write_bytes(exp.serialize())
        if flat is not None:
            np.savez(tmp / EXPORT_PARAMS, **flat)
        shutil.copyfile(VOCAB_PATH, tmp / VOCAB_FILE)
        with open(tmp / EXPORT_SPEC, "w") as f:
            json.dump(export_spec(loaded, bake_params=bake_params, platforms=platforms), f, indent=2)
        return cio.publish_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m metaclip_jax.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="params folder, training workdir / step folder, "
                   "open_clip folder, or .pt/.bin/.safetensors file")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="stored parameter dtype (--format params)")
    p.add_argument("--compute-dtype", default=None, choices=("float32", "bfloat16"),
                   help="matmul dtype recorded in the config and used by jax_export (default: the "
                   "checkpoint's)")
    p.add_argument("--model", default=None, help="preset name for open_clip files, e.g. ViT-B-32-quickgelu "
                   "(default: read the architecture from tensor shapes)")
    qg = p.add_mutually_exclusive_group()
    qg.add_argument("--quickgelu", dest="quick_gelu", action="store_true", default=None,
                    help="open_clip file uses QuickGELU (OpenAI, MetaCLIP 1)")
    qg.add_argument("--no-quickgelu", dest="quick_gelu", action="store_false",
                    help="open_clip file uses GELU")
    bake = p.add_mutually_exclusive_group()
    bake.add_argument("--bake-params", dest="bake_params", action="store_true", default=None,
                      help="jax_export: parameters as constants of the functions (default below 1 GB)")
    bake.add_argument("--pass-params", dest="bake_params", action="store_false",
                      help="jax_export: parameters as first argument, stored in params.npz")
    p.add_argument("--platforms", default=None,
                   help="jax_export: comma-separated lowering platforms (default: this backend), "
                   "e.g. cpu,cuda,tpu")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        loaded = cio.load_params(args.checkpoint, model=args.model, quick_gelu=args.quick_gelu)
    except (cio.CheckpointMismatch, ValueError, FileNotFoundError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.compute_dtype is not None:
        cfg = dataclasses.replace(loaded.config, dtype=args.compute_dtype)
        loaded = dataclasses.replace(loaded, config=cfg)
    act = getattr(loaded.config, "activation", "?")
    print(f"loaded {loaded.model_type} ({loaded.num_params:,} parameters, activation {act}) from "
          f"{loaded.source}", file=sys.stderr)
    try:
        if args.format == "params":
            out = cio.save_params(args.output, loaded, args.dtype, overwrite=args.overwrite)
        elif args.format == "open_clip":
            out = export_open_clip(loaded, args.output, overwrite=args.overwrite)
        else:
            platforms = args.platforms.split(",") if args.platforms else None
            out = export_jax(loaded, args.output, bake_params=args.bake_params, platforms=platforms,
                             overwrite=args.overwrite)
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.format} export to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

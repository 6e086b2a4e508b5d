"""Tasks: the MetaCLIP 26-task suite and CLIP_benchmark names, their prompts, and where their data is.

Prompts (class names and templates) are never copied into this repository. They come, in this order, from

1. files the user points to (``--classnames FILE --templates FILE``): JSON objects keyed by dataset name,
   either CLIP_benchmark's format (``{"cifar10": ["a photo of a {c}.", ...]}``) or MetaCLIP's
   ``clipeval/slip/templates.json`` / ``clipeval/labels.json`` (``{"CIFAR10": ["a photo of a {}.", ...]}``,
   labels may be synonym lists); a task is looked up by its name here, its MetaCLIP name and its
   CLIP_benchmark key;
2. the ``clip-benchmark`` package's ``en_classnames.json`` / ``en_zeroshot_classification_templates.json``
   (read as package data with ``importlib.resources``; none of its modules are imported beyond the empty
   top-level ``__init__``, so it is installed with ``pip install --no-deps clip-benchmark``);
3. for class names only: the dataset's own names (TFDS ClassLabel names or image-folder names) with
   ``_`` replaced by spaces, as CLIP_benchmark does for datasets it has no name list for.

Templates use ``{c}`` (CLIP_benchmark) or ``{}`` (MetaCLIP); both are substituted.

MetaCLIP suite vs CLIP_benchmark (clip-benchmark 1.6.2): the template counts of spec ``evaluation.md`` §3
are in ``METACLIP_TEMPLATE_COUNTS``; ``template_count_differences()`` lists where the package differs
(RESISC45: 18 vs 4, PatchCamelyon: 1 vs 2; FGVCAircraft and STL10 have 2 in both). Even where the counts
agree the wording can differ, and CUB200, UCF101, Kinetics700 and HatefulMemes have no CLIP_benchmark
prompts at all: to reproduce the MetaCLIP tables exactly, pass MetaCLIP's ``templates.json`` and
``labels.json`` as ``--templates`` / ``--classnames``.

Data specs (``DataSpec.parse``): ``tfds:NAME[,SPLIT]``, ``folder:PATH``, ``coco:ANNOTATIONS_JSON,IMAGE_DIR``,
``karpathy:DATASET_JSON,IMAGE_ROOT[,SPLIT]``, ``flickr:TOKEN_FILE,IMAGE_DIR[,SPLIT_FILE]``,
``captions:FILE.jsonl`` (one ``{"image": path, "captions": [...]}`` per line; relative paths are resolved
against the file's folder). ``resolve_data`` finds a task's data under ``--data-dir`` by convention.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from input_pipeline import eval_data

Label = str | list[str]


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    """A known task: names in the MetaCLIP suite and CLIP_benchmark, default TFDS dataset, metric."""

    name: str
    type: str = "zeroshot"                   # zeroshot | retrieval
    metaclip: str | None = None              # key in MetaCLIP templates.json / labels.json
    clip_benchmark: str | None = None        # key in clip-benchmark's JSON files
    tfds: str | None = None                  # TFDS name (array_record), e.g. "imagenet2012"
    split: str = "test"
    main_metric: str = "top1"                # top1 | mean_per_class_recall | top1_top5_mean | roc_auc


def _z(name: str, metaclip: str | None, cb: str | None, tfds: str | None = None, split: str = "test",
       main: str = "top1") -> TaskInfo:
    return TaskInfo(name, "zeroshot", metaclip, cb, tfds, split, main)


# The MetaCLIP 26-task suite in dataset_catalog.json order (spec evaluation.md §3).
METACLIP_SUITE: tuple[TaskInfo, ...] = (
    _z("food101", "Food101", "food101", "food101", "validation"),
    _z("cifar10", "CIFAR10", "cifar10", "cifar10"),
    _z("cifar100", "CIFAR100", "cifar100", "cifar100"),
    _z("cub200", "CUB200", None, "caltech_birds2011"),
    _z("sun397", "SUN397", "sun397", "sun397"),
    _z("cars", "StanfordCars", "cars", "cars196"),
    _z("fgvc_aircraft", "FGVCAircraft", "fgvc_aircraft", None, main="mean_per_class_recall"),
    _z("dtd", "DescribableTextures", "dtd", "dtd"),
    _z("pets", "OxfordPets", "pets", "oxford_iiit_pet", main="mean_per_class_recall"),
    _z("caltech101", "Caltech101", "caltech101", "caltech101", main="mean_per_class_recall"),
    _z("flowers", "Flowers102", "flowers", "oxford_flowers102", main="mean_per_class_recall"),
    _z("mnist", "MNIST", "mnist", "mnist"),
    _z("fer2013", "FacialEmotionRecognition2013", "fer2013"),
    _z("stl10", "STL10", "stl10", "stl10"),
    _z("eurosat", "EuroSAT", "eurosat"),
    _z("resisc45", "RESISC45", "resisc45"),
    _z("gtsrb", "GTSRB", "gtsrb"),
    _z("kitti", "KITTI", "kitti_closest_vehicle_distance"),
    _z("country211", "Country211", "country211"),
    _z("pcam", "PatchCamelyon", "pcam", "patch_camelyon"),
    _z("ucf101", "UCF101", None),
    _z("kinetics700", "Kinetics700", None, main="top1_top5_mean"),
    _z("clevr_counts", "CLEVRCounts", "clevr_count_all"),
    _z("hateful_memes", "HatefulMemes", None, main="roc_auc"),
    _z("sst2", "SST2", "renderedsst2"),
    _z("imagenet", "imagenet", "imagenet1k", "imagenet2012", "validation"),
)

# Template counts of the MetaCLIP suite (spec §3), to compare with whatever prompts are loaded.
METACLIP_TEMPLATE_COUNTS: dict[str, int] = {
    "Food101": 1, "CIFAR10": 18, "CIFAR100": 18, "CUB200": 1, "SUN397": 2, "StanfordCars": 8,
    "FGVCAircraft": 2, "DescribableTextures": 8, "OxfordPets": 1, "Caltech101": 34, "Flowers102": 1,
    "MNIST": 1, "FacialEmotionRecognition2013": 6, "STL10": 2, "EuroSAT": 3, "RESISC45": 18, "GTSRB": 3,
    "KITTI": 1, "Country211": 5, "PatchCamelyon": 1, "UCF101": 48, "Kinetics700": 28, "CLEVRCounts": 1,
    "HatefulMemes": 1, "SST2": 1, "imagenet": 80,
}

RETRIEVAL_TASKS: tuple[TaskInfo, ...] = (
    TaskInfo("coco", "retrieval"),
    TaskInfo("flickr30k", "retrieval"),
    TaskInfo("flickr8k", "retrieval"),
)

# Other CLIP_benchmark datasets with a TFDS array_record equivalent.
EXTRA_ZEROSHOT: tuple[TaskInfo, ...] = (
    _z("svhn", None, "svhn", "svhn_cropped"),
    _z("imagenetv2", None, "imagenet1k", "imagenet_v2"),
    _z("imagenet_sketch", None, "imagenet1k", "imagenet_sketch"),
    _z("imagenet_r", None, None, "imagenet_r"),
    _z("imagenet_a", None, None, "imagenet_a"),
)

_ALIASES = {"in1k": "imagenet", "imagenet1k": "imagenet", "imagenet2012": "imagenet", "c10": "cifar10",
            "c100": "cifar100", "aircraft": "fgvc_aircraft", "fgvcaircraft": "fgvc_aircraft",
            "stanfordcars": "cars", "oxfordpets": "pets", "flowers102": "flowers", "fer": "fer2013",
            "clevr": "clevr_counts", "k700": "kinetics700", "hatefulmemes": "hateful_memes",
            "renderedsst2": "sst2", "patchcamelyon": "pcam", "mscoco": "coco", "flickr": "flickr30k"}

SUITES: dict[str, tuple[str, ...]] = {
    "metaclip26": tuple(t.name for t in METACLIP_SUITE),
    "retrieval": tuple(t.name for t in RETRIEVAL_TASKS),
}


def get_task(name: str) -> TaskInfo:
    """A task by our name, alias, MetaCLIP name or CLIP_benchmark key; unknown names become zero-shot
    tasks with that name (prompts then must come from files or CLIP_benchmark)."""
    key = _ALIASES.get(name.lower(), name.lower())
    for t in METACLIP_SUITE + RETRIEVAL_TASKS + EXTRA_ZEROSHOT:
        if key in (t.name, (t.metaclip or "").lower(), (t.clip_benchmark or "").lower()):
            return t
    cb = key if key in clip_benchmark_templates() or key in clip_benchmark_classnames() else None
    return TaskInfo(name=key, clip_benchmark=cb)


def expand_tasks(spec: str | Sequence[str]) -> list[str]:
    """``"imagenet,cifar10,coco"`` or suite names (``metaclip26``, ``retrieval``) -> task names."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in (s.strip() for s in items):
        if not item:
            continue
        for name in SUITES.get(item.lower(), (item,)):
            if name not in out:
                out.append(name)
    return out


# ---------------------------------------------------------------------------------------- prompts

@functools.cache
def _clip_benchmark_json(filename: str) -> dict[str, Any]:
    try:
        from importlib import resources

        res = resources.files("clip_benchmark").joinpath("datasets", filename)
        return json.loads(res.read_text(encoding="utf-8"))
    except (ModuleNotFoundError, FileNotFoundError) as e:
        logging.warning("clip-benchmark prompts unavailable (%s); install it with "
                        "`pip install --no-deps clip-benchmark`", e)
        return {}


def clip_benchmark_classnames() -> dict[str, list[str]]:
    """clip-benchmark's ``en_classnames.json`` ({} when the package is not installed)."""
    return _clip_benchmark_json("en_classnames.json")


def clip_benchmark_templates() -> dict[str, list[str]]:
    """clip-benchmark's ``en_zeroshot_classification_templates.json`` ({} when not installed)."""
    return _clip_benchmark_json("en_zeroshot_classification_templates.json")


def template_count_differences() -> dict[str, tuple[int, int | None]]:
    """MetaCLIP suite tasks whose CLIP_benchmark template count differs: name -> (MetaCLIP, CB or None)."""
    cb = clip_benchmark_templates()
    out = {}
    for t in METACLIP_SUITE:
        n_cb = len(cb[t.clip_benchmark]) if t.clip_benchmark in cb else None
        if n_cb != METACLIP_TEMPLATE_COUNTS[t.metaclip]:
            out[t.name] = (METACLIP_TEMPLATE_COUNTS[t.metaclip], n_cb)
    return out


def load_json_file(path: str | None) -> dict[str, Any]:
    """A JSON object from a file (``{}`` for None)."""
    if not path:
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object keyed by dataset name")
    return data


def _lookup(table: Mapping[str, Any], task: TaskInfo) -> Any:
    lower = {k.lower(): v for k, v in table.items()}
    for key in (task.name, task.metaclip, task.clip_benchmark):
        if key and key.lower() in lower:
            return lower[key.lower()]
    return None


def format_prompt(template: str, name: str) -> str:
    """Substitute a class name for ``{c}`` or ``{}`` (str.replace: literal braces elsewhere are kept)."""
    return template.replace("{c}", name) if "{c}" in template else template.replace("{}", name)


def resolve_prompts(task: TaskInfo, dataset_classes: Sequence[str] | None = None,
                    classnames_file: str | Mapping[str, Any] | None = None,
                    templates_file: str | Mapping[str, Any] | None = None,
                    classnames: Sequence[Label] | None = None, templates: Sequence[str] | None = None,
                    ) -> tuple[list[Label], list[str], dict[str, str]]:
    """(class names, templates, where each came from) for a zero-shot task (see module docstring)."""
    origin: dict[str, str] = {}
    user_names = classnames_file if isinstance(classnames_file, Mapping) else load_json_file(classnames_file)
    user_tmpl = templates_file if isinstance(templates_file, Mapping) else load_json_file(templates_file)
    names: Any = classnames
    if names is not None:
        origin["classnames"] = "explicit"
    elif (names := _lookup(user_names, task)) is not None:
        origin["classnames"] = "file"
    elif (names := _lookup(clip_benchmark_classnames(), task)) is not None:
        origin["classnames"] = "clip_benchmark"
    elif dataset_classes is not None:
        names = [c.replace("_", " ") for c in dataset_classes]
        origin["classnames"] = "dataset"
    else:
        raise ValueError(f"task {task.name!r}: no class names (pass --classnames FILE; the dataset has no "
                         "class names)")
    tmpl: Any = templates
    if tmpl is not None:
        origin["templates"] = "explicit"
    elif (tmpl := _lookup(user_tmpl, task)) is not None:
        origin["templates"] = "file"
    elif (tmpl := _lookup(clip_benchmark_templates(), task)) is not None:
        origin["templates"] = "clip_benchmark"
    elif (tmpl := clip_benchmark_templates().get("imagenet1k")) is not None:
        logging.warning("task %s: no templates known, using the ImageNet templates (CLIP_benchmark's "
                        "fallback)", task.name)
        origin["templates"] = "clip_benchmark:imagenet1k"
    else:
        raise ValueError(f"task {task.name!r}: no templates (pass --templates FILE or install "
                         "clip-benchmark)")
    names = [list(n) if isinstance(n, list | tuple) else str(n) for n in names]
    if dataset_classes is not None and len(names) != len(dataset_classes):
        raise ValueError(f"task {task.name!r}: {len(names)} class names ({origin['classnames']}) but the "
                         f"dataset has {len(dataset_classes)} classes")
    return names, [str(t) for t in tmpl], origin


def expand_prompts(classnames: Sequence[Label], templates: Sequence[str]) -> tuple[list[str], list[int]]:
    """All prompts (per class: every template x every synonym) and the class index of each."""
    prompts: list[str] = []
    owner: list[int] = []
    for c, label in enumerate(classnames):
        synonyms = label if isinstance(label, list) else [label]
        for t in templates:
            for s in synonyms:
                prompts.append(format_prompt(t, s))
                owner.append(c)
    return prompts, owner


# ------------------------------------------------------------------------------------------ data

@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Where a task's examples are: ``kind`` in tfds | folder | coco | karpathy | flickr | captions."""

    kind: str
    path: str
    extra: tuple[str, ...] = ()
    split: str | None = None
    data_dir: str | None = None

    KINDS = ("tfds", "folder", "coco", "karpathy", "flickr", "captions")

    @classmethod
    def parse(cls, spec: str | Mapping[str, Any] | DataSpec, data_dir: str | None = None) -> DataSpec:
        """From ``kind:arg1,arg2,...`` or a dict ``{kind, path, extra?, split?, data_dir?}``."""
        if isinstance(spec, DataSpec):
            return spec
        if isinstance(spec, Mapping):
            d = dict(spec)
            kind = d.pop("kind")
            path = d.pop("path", None) or d.pop("name")
            extra = tuple(d.pop("extra", ()))
            out = cls(kind, path, extra, d.pop("split", None), d.pop("data_dir", data_dir))
            if d:
                raise ValueError(f"unknown data spec keys {sorted(d)}")
        else:
            kind, sep, rest = spec.partition(":")
            if not sep:
                raise ValueError(f"data spec {spec!r}: expected KIND:ARGS with KIND in {cls.KINDS}")
            args = rest.split(",")
            split = None
            if kind == "tfds" and len(args) > 1:
                split = args.pop(1)
            if kind == "karpathy" and len(args) > 2:
                split = args.pop(2)
            out = cls(kind, args[0], tuple(args[1:]), split, data_dir)
        if out.kind not in cls.KINDS:
            raise ValueError(f"data spec kind {out.kind!r} not in {cls.KINDS}")
        return out

    def build(self, task: TaskInfo) -> Any:
        """The random-access source (``input_pipeline.eval_data``)."""
        if self.kind == "tfds":
            return eval_data.TfdsSource(self.path, split=self.split or task.split, data_dir=self.data_dir)
        if self.kind == "folder":
            return eval_data.ImageFolderSource(self.path)
        if self.kind == "coco":
            return eval_data.coco_captions(self.path, self.extra[0])
        if self.kind == "flickr":
            return eval_data.flickr_captions(self.path, self.extra[0],
                                             self.extra[1] if len(self.extra) > 1 else None)
        if self.kind == "karpathy":
            return karpathy_captions(self.path, self.extra[0] if self.extra else os.path.dirname(self.path),
                                     self.split or "test")
        return jsonl_captions(self.path)


def karpathy_captions(dataset_json: str, image_root: str, split: str = "test") -> eval_data.CaptionSource:
    """Karpathy split file (``dataset_coco.json`` / ``dataset_flickr30k.json``): images of one split with
    their ``sentences[*].raw``; an image's path is ``image_root/[filepath/]filename``."""
    with open(dataset_json, encoding="utf-8") as f:
        data = json.load(f)
    paths, caps = [], []
    for im in data["images"]:
        if im.get("split") != split:
            continue
        rel = os.path.join(im.get("filepath", ""), im["filename"])
        paths.append(os.path.join(image_root, rel))
        caps.append([s["raw"].strip() for s in im["sentences"]])
    if not paths:
        raise ValueError(f"{dataset_json}: no images in split {split!r}")
    return eval_data.CaptionSource(paths, caps)


def jsonl_captions(path: str) -> eval_data.CaptionSource:
    """JSON lines ``{"image": path, "captions": [...]}``; relative image paths are relative to the file."""
    root = os.path.dirname(os.path.abspath(path))
    paths, caps = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            paths.append(os.path.join(root, row["image"]))
            caps.append([str(c) for c in row["captions"]])
    return eval_data.CaptionSource(paths, caps)


CAPTION_KINDS = ("coco", "karpathy", "flickr", "captions")


def task_type(task: TaskInfo, spec: DataSpec) -> str:
    """``retrieval`` for caption data, ``zeroshot`` otherwise."""
    return "retrieval" if spec.kind in CAPTION_KINDS else "zeroshot"


def resolve_data(task: TaskInfo, data_dir: str | None) -> DataSpec:
    """Find a task's data under ``data_dir`` by convention.

    Retrieval: ``<dir>/<task>.jsonl``, ``<dir>/<task>/captions.jsonl``, ``<dir>/<task>/dataset_*.json``
    (Karpathy, images under ``<dir>/<task>``), ``<dir>/<task>/annotations.json`` + ``images/`` (COCO JSON).
    Zero-shot: a TFDS array_record build ``<dir>/<tfds name>/`` (read with ``tfds.data_source``), else an
    image folder ``<dir>/<task>/{test,val,validation}/`` or ``<dir>/<task>/`` with class subfolders. A task
    name outside the suites is looked up as a caption set first, so ``--tasks mycaptions`` works too.
    """
    if not data_dir:
        raise ValueError(f"task {task.name!r}: no data (pass --data-dir or --source {task.name}=SPEC)")
    base = os.path.join(data_dir, task.name)
    if task.type == "retrieval":
        for p in (base + ".jsonl", os.path.join(base, "captions.jsonl")):
            if os.path.isfile(p):
                return DataSpec("captions", p)
        if os.path.isdir(base):
            for f in sorted(os.listdir(base)):
                if f.startswith("dataset_") and f.endswith(".json"):
                    return DataSpec("karpathy", os.path.join(base, f), (base,), "test")
            ann = os.path.join(base, "annotations.json")
            if os.path.isfile(ann):
                return DataSpec("coco", ann, (os.path.join(base, "images"),))
        raise FileNotFoundError(f"task {task.name!r}: no caption file under {base}")
    if task.tfds and os.path.isdir(os.path.join(data_dir, task.tfds.split("/")[0])):
        return DataSpec("tfds", task.tfds, (), task.split, data_dir)
    if task.metaclip is None and task.clip_benchmark is None:  # a task of the user's: captions?
        try:
            return resolve_data(TaskInfo(task.name, "retrieval"), data_dir)
        except FileNotFoundError:
            pass
    for split in ("test", "val", "validation"):
        if os.path.isdir(os.path.join(base, split)):
            return DataSpec("folder", os.path.join(base, split))
    if os.path.isdir(base):
        return DataSpec("folder", base)
    raise FileNotFoundError(f"task {task.name!r}: neither a TFDS build {task.tfds!r} nor an image folder "
                            f"{base} under {data_dir}")

"""metaclip-jax: MetaCLIP curation and CLIP / Llip training and evaluation in JAX."""

"""How good the samples are: subject and prompt fidelity scored at every validation.

`fidelity` holds the arithmetic (CLIP-T, CLIP-I, DINO as cosine similarities),
`embedders` the evaluator models (CLIP, a DINO ViT) loaded from local folders,
`sources` where those folders come from, `references` which real images each
sample is compared with, `scores` what one validation measured, and `validation`
the rank-0 scoring of one validation's samples.
"""

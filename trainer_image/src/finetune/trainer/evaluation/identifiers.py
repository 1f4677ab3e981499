"""The text `clipText` compares a sample with: its prompt without the subject's identifier.

A job binds its subject to a word the evaluator's CLIP has never learned (`sks` in "a
photo of sks dog", a Custom Diffusion `<new1>`): CLIP reads it as noise, which lowers
every figure and blurs what clipText should measure, whether the sample shows what the
rest of the prompt asks for. So the identifier is left out of the text, as the DreamBooth
and Custom Diffusion evaluations leave it out.

The identifiers are Custom Diffusion's modifier tokens, and for each concept with a class
prompt the one word its instance prompt adds to it ("a photo of sks dog" beside "a photo
of dog"). Where the two differ by more than one word nothing is guessed: that concept's
prompts are scored as they are.
"""

from __future__ import annotations

from finetune.api.methods import Method
from finetune.api.training import TrainingSpec

_EDGES = ".,;:!?\"'()[]"


def identifiers(spec: TrainingSpec) -> tuple[str, ...]:
    """The words validation prompts name their subjects by, as they are written in the job."""
    found: list[str] = []
    if spec.method == Method.CUSTOM_DIFFUSION and spec.custom_diffusion is not None:
        found += spec.custom_diffusion.modifier_tokens
    for concept in spec.data.concepts:
        if concept.class_prompt is None:
            continue
        known = {_word(w) for w in concept.class_prompt.split()}
        added = [w for w in concept.instance_prompt.split() if _word(w) not in known]
        if len(added) == 1:
            found.append(added[0].strip(_EDGES))
    return tuple(dict.fromkeys(w for w in found if w))


def scored_text(prompt: str, names: tuple[str, ...]) -> str:
    """`prompt` without the words in `names` (case and edge punctuation aside)."""
    left_out = {_word(name) for name in names}
    kept = [w for w in prompt.split() if _word(w) not in left_out]
    return " ".join(kept) if kept else prompt


def _word(text: str) -> str:
    return text.strip(_EDGES).lower()

"""Which real images each validation sample is compared with.

A concept's reference images are its held-out instance images (`holdOut`), or all of
them when none are held out (then the score measures how close samples come to the
training images themselves, a weaker test). The rule that pairs samples with them:

- dreambooth and lora train their concepts together: one group, `all`, holds every
  concept's references, and every validation prompt's samples are compared with it.
- customDiffusion binds each concept to a modifier token: a group per token holds the
  references of the concepts whose `instancePrompt` contains it, and a prompt's samples
  are compared with the group of every token the prompt contains (a prompt composing two
  concepts counts for both). Samples of a prompt with no token count for clipText only.

With prior preservation, PRES compares the samples of each class prompt with that
class's images (`class_references`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from finetune.api.methods import Method
from finetune.api.training import TrainingSpec
from finetune.trainer.data.class_homes import field_of
from finetune.trainer.data.concepts import examples_from, split_held_out
from finetune.trainer.evaluation.scores import ALL


@dataclass(frozen=True)
class ReferenceGroup:
    label: str  # `all`, or a customDiffusion modifier token
    images: tuple[Path, ...]
    token: str | None = None  # customDiffusion: the token a prompt must contain
    tokens: tuple[str, ...] = ()  # customDiffusion: every modifier token of the job

    def takes(self, prompt: str) -> bool:
        return self.token is None or self.token in modifier_tokens_in(prompt, self.tokens)


def modifier_tokens_in(text: str, tokens: tuple[str, ...]) -> set[str]:
    """The modifier tokens `text` holds, found as the tokenizer finds added tokens: left to
    right, the longest at each place, so `sks10` holds `sks10` and not `sks1`."""
    if not tokens:
        return set()
    longest_first = sorted(tokens, key=len, reverse=True)
    return set(re.findall("|".join(map(re.escape, longest_first)), text))


def concept_references(spec: TrainingSpec, folders: list[Path]) -> list[tuple[Path, ...]]:
    """Each concept's reference images, in the order of `data.concepts`."""
    found = []
    for index, (concept, folder) in enumerate(zip(spec.data.concepts, folders, strict=True)):
        field = f"spec.data.concepts[{index}].instanceImages"
        examples = examples_from(folder, concept.instance_prompt, False, field, check=False)
        training, held = split_held_out(examples, concept.hold_out)
        found.append(tuple(e.image for e in held or training))
    return found


def reference_groups(spec: TrainingSpec, folders: list[Path]) -> list[ReferenceGroup]:
    references = concept_references(spec, folders)
    if spec.method != Method.CUSTOM_DIFFUSION or spec.custom_diffusion is None:
        return [ReferenceGroup(ALL, tuple(p for images in references for p in images))]
    groups = []
    tokens = tuple(spec.custom_diffusion.modifier_tokens)
    for token in tokens:
        images = tuple(
            p
            for concept, paths in zip(spec.data.concepts, references, strict=True)
            if token in modifier_tokens_in(concept.instance_prompt, tokens)
            for p in paths
        )
        if images:
            groups.append(ReferenceGroup(token, images, token, tokens))
    return groups


def class_references(spec: TrainingSpec, folders: list[Path]) -> list[ReferenceGroup]:
    """Prior preservation's class prompts, each with the class images of its concepts
    (the ones training uses): the references of PRES. A class prompt shared by several
    concepts is one group, labelled by the prompt."""
    grouped: dict[str, list[Path]] = {}
    for index, (concept, folder) in enumerate(zip(spec.data.concepts, folders, strict=True)):
        assert concept.class_prompt is not None, "prior preservation needs each classPrompt"
        field = field_of(spec, index)  # where they are kept
        examples = examples_from(folder, concept.class_prompt, False, field, check=False)
        paths = [e.image for e in examples[: concept.class_images.count]]
        grouped.setdefault(concept.class_prompt, []).extend(paths)
    return [ReferenceGroup(prompt, tuple(images)) for prompt, images in grouped.items() if images]


def groups_of_prompt(prompt: str, groups: list[ReferenceGroup]) -> list[int]:
    """Indices of the groups `prompt`'s samples are compared with."""
    return [i for i, group in enumerate(groups) if group.takes(prompt)]

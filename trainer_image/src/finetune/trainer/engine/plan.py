"""What the launcher hands each worker: the job's spec and the local paths it resolved."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from finetune.api.training import TrainingSpec
from finetune.trainer.data.class_homes import ClassHome, field_of


@dataclass(frozen=True)
class RunPlan:
    """What the launcher resolved before starting the workers: local paths only."""

    name: str
    spec: TrainingSpec
    work_dir: Path
    model_folder: Path
    concept_folders: list[Path]
    class_folders: list[Path]
    output_uri: str
    family: str = "sd"  # `spec.baseModel.family` as the launcher resolved it (auto read)
    teacher_folder: Path | None = None
    vae_folder: Path | None = None  # `spec.baseModel.vaeUri`, where it is given
    # The evaluator models of `validation.metrics`, where the job needs them.
    clip_folder: Path | None = None
    dino_folder: Path | None = None
    # The fingerprint (`models.fingerprint`) of each model input's folder, by the spec
    # field naming it: a checkpoint records them, and resume refuses another model.
    model_fingerprints: dict[str, str] = field(default_factory=dict)
    # The S3 prefix each class folder mirrors (`class_homes`), None for a local one.
    class_uris: list[str | None] = field(default_factory=list)

    @property
    def class_homes(self) -> list[ClassHome]:
        uris = self.class_uris or [None] * len(self.class_folders)
        return [
            ClassHome(folder, uri, field_of(self.spec, index))
            for index, (folder, uri) in enumerate(zip(self.class_folders, uris, strict=True))
        ]

    def to_json(self) -> str:
        return json.dumps(
            {
                "name": self.name,
                "spec": self.spec.model_dump(mode="json", by_alias=True, exclude_none=True),
                "workDir": str(self.work_dir),
                "modelFolder": str(self.model_folder),
                "conceptFolders": [str(p) for p in self.concept_folders],
                "classFolders": [str(p) for p in self.class_folders],
                "outputUri": self.output_uri,
                "family": self.family,
                "teacherFolder": _text(self.teacher_folder),
                "vaeFolder": _text(self.vae_folder),
                "clipFolder": _text(self.clip_folder),
                "dinoFolder": _text(self.dino_folder),
                "modelFingerprints": self.model_fingerprints,
                "classUris": self.class_uris,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> RunPlan:
        raw = json.loads(text)
        return cls(
            name=raw["name"],
            spec=TrainingSpec.model_validate(raw["spec"]),
            work_dir=Path(raw["workDir"]),
            model_folder=Path(raw["modelFolder"]),
            concept_folders=[Path(p) for p in raw["conceptFolders"]],
            class_folders=[Path(p) for p in raw["classFolders"]],
            output_uri=raw["outputUri"],
            family=raw.get("family", "sd"),
            teacher_folder=_path(raw.get("teacherFolder")),
            vae_folder=_path(raw.get("vaeFolder")),
            clip_folder=_path(raw.get("clipFolder")),
            dino_folder=_path(raw.get("dinoFolder")),
            model_fingerprints=raw.get("modelFingerprints", {}),
            class_uris=raw.get("classUris", []),
        )


def _text(path: Path | None) -> str | None:
    return str(path) if path is not None else None


def _path(text: str | None) -> Path | None:
    return Path(text) if text else None

"""`finetune validate` and `finetune crd` as a user runs them: the real console script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune.api.loading import load_job
from tests.support import CRD_PATH, EXAMPLES, lora_job

# The console script pip installed beside this interpreter.
FINETUNE = Path(sys.executable).parent / "finetune"


def run(*args: str, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    assert FINETUNE.exists(), "the finetune console script is not installed (make setup)"
    return subprocess.run(
        [str(FINETUNE), *args], capture_output=True, text=True, check=False, timeout=timeout
    )


def refusal(path: str, timeout: float | None = None) -> str:
    """What `finetune validate` says of a file it must refuse (exit 2)."""
    result = run("validate", path, timeout=timeout)
    assert result.returncode == 2, result.stderr
    return result.stderr.strip()


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_every_example_is_valid() -> None:
    assert len(EXAMPLES) >= 5
    result = run("validate", *map(str, EXAMPLES))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(": valid (") == len(EXAMPLES)


def test_examples_cover_every_method() -> None:
    methods = {yaml.safe_load(p.read_text())["spec"]["method"] for p in EXAMPLES}
    assert methods == {"dreambooth", "lora", "customDiffusion", "lcm", "lcmLora"}


def test_a_wrong_field_exits_2_and_names_it(tmp_path: Path) -> None:
    path = write(tmp_path, "job.yaml", yaml.safe_dump(lora_job(training={"learningRate": 0})))
    result = run("validate", path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"{path}: spec.training.learningRate: must be greater than 0"
    ]


def test_one_line_per_problem(tmp_path: Path) -> None:
    document = lora_job(training={"maxSteps": 0, "seeed": 1}, deepspeed={"zeroStage": 9})
    path = write(tmp_path, "job.yaml", yaml.safe_dump(document))
    lines = run("validate", path).stderr.splitlines()
    assert sorted(line.split(": ")[1] for line in lines) == [
        "spec.deepspeed.zeroStage",
        "spec.training.maxSteps",
        "spec.training.seeed",
    ]


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    text = (
        "apiVersion: finetune.dev/v1alpha1\nkind: FineTuneJob\nspec:\n  method: lora\n   data: [\n"
    )
    path = write(tmp_path, "broken.yaml", text)
    result = run("validate", path)
    assert result.returncode == 2
    assert result.stderr.startswith(f"{path}: line 5, column 8: YAML syntax error:")


DUPLICATE_SEED = """\
apiVersion: finetune.dev/v1alpha1
kind: FineTuneJob
metadata:
  name: dog-lora
spec:
  method: lora
  baseModel: {uri: "hf://org/model@v1"}
  data:
    concepts: [{instanceImages: ./dog, instancePrompt: a photo of sks dog}]
  training:
    seed: 1
    maxSteps: 100
    seed: 2
  output: {uri: "s3://bucket/out"}
"""


@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_duplicate_key_is_refused_with_its_line(tmp_path: Path, command: str) -> None:
    """PyYAML alone keeps the last `seed` and calls the file valid."""
    path = write(tmp_path, "job.yaml", DUPLICATE_SEED)
    result = run(command, path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"{path}: line 13, column 5: duplicate key 'seed' (first on line 11)"
    ]


def test_anchors_merged_with_a_key_may_override_it(tmp_path: Path) -> None:
    text = DUPLICATE_SEED.replace("    seed: 1\n", "    <<: {seed: 1}\n")
    result = run("validate", write(tmp_path, "job.yaml", text))
    assert result.returncode == 0, result.stderr


def test_wrong_kind_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "pod.yaml", yaml.safe_dump({**lora_job(), "kind": "PyTorchJob"}))
    result = run("validate", path)
    assert result.returncode == 2
    assert f"{path}: kind: must be 'FineTuneJob', got 'PyTorchJob'" in result.stderr


def test_multi_document_files_name_the_document(tmp_path: Path) -> None:
    good, bad = lora_job(), lora_job(method="dreambooth", lora={"rank": 2})
    path = write(tmp_path, "two.yaml", yaml.safe_dump(good) + "---\n" + yaml.safe_dump(bad))
    result = run("validate", path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"{path}: document 2: spec.lora: is only used when method is lcmLora or lora, not dreambooth"
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("", "no FineTuneJob in the file"),
        ("- a\n- b\n", "expected a mapping, got a list"),
    ],
)
def test_unusable_files_are_explained(tmp_path: Path, content: str | None, message: str) -> None:
    path = str(tmp_path / "job.yaml") if content is None else write(tmp_path, "job.yaml", content)
    result = run("validate", path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"{path}: {message}"


def test_valid_and_invalid_files_together_exit_2(tmp_path: Path) -> None:
    bad = write(tmp_path, "bad.yaml", yaml.safe_dump(lora_job(method="nope")))
    result = run("validate", str(EXAMPLES[0]), bad)
    assert result.returncode == 2
    assert f"{EXAMPLES[0]}: valid" in result.stdout
    assert result.stderr.startswith(f"{bad}: spec.method:")


def test_crd_prints_the_committed_file() -> None:
    result = run("crd")
    assert result.returncode == 0
    assert result.stdout == CRD_PATH.read_text()


def test_the_model_family_is_auto_sd_or_sdxl(tmp_path: Path) -> None:
    job = lora_job()
    job["spec"]["baseModel"]["family"] = "sdxl"
    assert run("validate", write(tmp_path, "ok.yaml", yaml.safe_dump(job))).returncode == 0
    job["spec"]["baseModel"]["family"] = "flux"
    result = run("validate", write(tmp_path, "job.yaml", yaml.safe_dump(job)))
    assert result.returncode == 2
    assert ": spec.baseModel.family: " in result.stderr, result.stderr


def test_crd_into_a_path_that_cannot_be_written_names_it(tmp_path: Path) -> None:
    for path, reason in (
        (tmp_path / "missing" / "crd.yaml", "No such file or directory"),
        (tmp_path, "Is a directory"),
    ):
        result = run("crd", "-o", str(path))
        assert result.returncode == 2
        assert result.stderr.strip() == f"error: --output {path}: {reason}"


def test_an_empty_output_is_refused_not_taken_for_none(tmp_path: Path) -> None:
    """`finetune run job.yaml --output "$OUT"` with OUT unset must not write into
    spec.output.uri unasked."""
    job = write(tmp_path, "job.yaml", yaml.safe_dump(lora_job()))
    result = run("run", job, "--output", "")
    assert result.returncode == 2
    assert "argument --output: must not be empty" in result.stderr


def test_an_unquoted_no_read_as_false_is_explained(tmp_path: Path) -> None:
    """The README writes `mixedPrecision: no`; YAML 1.1 reads it as a boolean."""
    text = yaml.safe_dump(lora_job(training={"mixedPrecision": "fp16"}))
    path = write(tmp_path, "job.yaml", text.replace("mixedPrecision: fp16", "mixedPrecision: no"))
    assert refusal(path) == (
        f"{path}: spec.training.mixedPrecision: must be 'no', 'fp16' or 'bf16'; YAML read "
        'false (an unquoted no or off): quote the word, as in "no"'
    )


def test_a_quoted_number_is_refused_with_a_hint(tmp_path: Path) -> None:
    """kubectl apply refuses `maxSteps: "200"`; so does finetune, saying what to change."""
    text = yaml.safe_dump(lora_job(training={"maxSteps": 200}))
    path = write(tmp_path, "job.yaml", text.replace("maxSteps: 200", 'maxSteps: "200"'))
    assert refusal(path) == (
        f"{path}: spec.training.maxSteps: must be a valid integer; "
        "got the text '200': write it without quotes"
    )


def test_a_date_is_text_and_a_binary_value_is_refused(tmp_path: Path) -> None:
    """A prompt that looks like a date stays its text, as kubectl reads it; a value
    only a YAML tag can make names its field."""
    text = yaml.safe_dump(lora_job()).replace("a photo of sks dog", "2026-01-01")
    assert load_job(write(tmp_path, "date.yaml", text)).spec.data.concepts[0].instance_prompt == (
        "2026-01-01"
    )
    path = write(tmp_path, "binary.yaml", text.replace("2026-01-01", "!!binary aGk="))
    assert refusal(path) == (
        f"{path}: spec.data.concepts[0].instancePrompt: "
        "a !!binary value has no place in a job; write it as plain text"
    )


BOMB = "l0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"l{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9)
)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: &a [*a]\n", "a[0]: a YAML alias refers to a value that holds it"),
        (BOMB, "more than 100000 values: YAML aliases expand too far"),
        ("a: " + "[" * 5000 + "]" * 5000 + "\n", "values nested too deeply to be a job"),
    ],
    ids=["alias-cycle", "alias-bomb", "deep"],
)
def test_hostile_yaml_is_refused_quickly(tmp_path: Path, text: str, message: str) -> None:
    """A self-referencing alias, a billion-laughs bomb (10^8 values from 300 bytes) and
    deep nesting each end in an exit 2 with a reason, in seconds."""
    said = refusal(write(tmp_path, "job.yaml", text), timeout=60)
    assert message in said
    assert "Traceback" not in said


def test_the_assets_builder_explains_itself_instead_of_building_a_folder_named_help(
    tmp_path: Path,
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "finetune.assets", "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0
    assert result.stdout.startswith("usage: python -m finetune.assets")
    assert list(tmp_path.iterdir()) == []

"""The contract between the operator's training pods and the trainer in them.

The operator builds each pod from these names (its `builders`) and reads back
the exit codes and the status fields below; the trainer reads the same names.
One side never spells the other's strings.
"""

from __future__ import annotations

from .status import FineTuneJobStatus

# --- environment the operator sets in every training pod ------------------------------

NNODES_ENV = "FINETUNE_NNODES"
NPROC_PER_NODE_ENV = "FINETUNE_NPROC_PER_NODE"
# A pod's node rank is its Indexed Job's completion index; FINETUNE_NODE_RANK wins
# where set, for gangs started by hand.
NODE_RANK_ENV = "FINETUNE_NODE_RANK"
COMPLETION_INDEX_ENV = "JOB_COMPLETION_INDEX"
MASTER_ADDR_ENV = "MASTER_ADDR"
MASTER_PORT_ENV = "MASTER_PORT"
CACHE_DIR_ENV = "FINETUNE_CACHE_DIR"
JOB_NAME_ENV = "FINETUNE_JOB_NAME"
NAMESPACE_ENV = "FINETUNE_NAMESPACE"
# The gang attempt, so a new attempt takes over its dead predecessor's output lease.
ATTEMPT_ENV = "FINETUNE_ATTEMPT"
PUSHGATEWAY_URL_ENV = "FINETUNE_PUSHGATEWAY_URL"
HF_HUB_OFFLINE_ENV = "HF_HUB_OFFLINE"
HF_TOKEN_ENV = "HF_TOKEN"  # spec.baseModel.hubTokenSecretRef's: the base model, its VAE, evaluators
# spec.lcm.teacherModel.hubTokenSecretRef's: the teacher's download (HF_TOKEN's without it)
TEACHER_HF_TOKEN_ENV = "FINETUNE_TEACHER_HF_TOKEN"

# --- environment the trainer reads whose defaults are the pod's -----------------------
# Tests and workstations set these; in a pod the defaults below apply.

STATUS_API_ENV = "FINETUNE_STATUS_API"  # default: the in-cluster API server
STATUS_INTERVAL_ENV = "FINETUNE_STATUS_INTERVAL"
SERVICE_ACCOUNT_DIR_ENV = "FINETUNE_SERVICE_ACCOUNT_DIR"
TERMINATION_LOG_ENV = "FINETUNE_TERMINATION_LOG"
# Not the operator's own FINETUNE_METRICS_PORT: this is each training pod's.
TRAINER_METRICS_PORT_ENV = "FINETUNE_TRAINER_METRICS_PORT"
LOG_LEVEL_ENV = "FINETUNE_LOG_LEVEL"  # the trainer's log level: debug, info, warning, error

# --- ports ----------------------------------------------------------------------------

RENDEZVOUS_PORT = 29500  # rank 0's, on the gang's headless service
TRAINER_METRICS_PORT = 9400  # the container port named `metrics`

# --- paths ----------------------------------------------------------------------------

CONFIG_DIR = "/etc/finetune"  # the job's ConfigMap, mounted
JOB_FILE = "job.yaml"  # its key there
CACHE_DIR = "/var/cache/finetune"
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
TERMINATION_LOG = "/dev/termination-log"  # Kubernetes shows it as the pod's reason

# --- exit codes -----------------------------------------------------------------------
# Of `finetune run` / `finetune train` (and of each training process). The operator
# reads them to classify a failure:
#   0   done
#   1   anything else (a bug, out of memory, a lost rank, S3 or the hub unreachable
#       after the retries): may be worth a retry
#   2   bad input (a missing folder, an unreadable image, not a model, an output that
#       is a file or cannot be written, `--nproc` out of range, an output another run
#       holds): permanent
#   3   the loss became NaN or infinite: the hyperparameters diverge; retrying
#       the same spec diverges again
#   4   S3 or the hub refused the credentials: permanent until the secret changes
#   5   no local disk space left to save a checkpoint or the results: permanent
#       for this volume; the previous checkpoint stays intact
#   130 stopped on request (SIGINT/SIGTERM/SIGHUP): with a checkpoint saved once
#       training began; before that, with nothing written

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INVALID_INPUT = 2
EXIT_NON_FINITE_LOSS = 3
EXIT_ACCESS_DENIED = 4
EXIT_DISK_FULL = 5
EXIT_INTERRUPTED = 130

# --- who writes which status field ----------------------------------------------------
# Each side patches only its own fields, so neither overwrites the other's. One
# exception: the progress fields that describe a running gang (what kubectl's ETA and
# Img/s columns show) the operator clears when the job stops running (it leaves
# Running, or is finished), since no trainer is left to update them; the trainer
# writes them again when it next reports.

TRAINER_FIELDS = ("progress", "lastCheckpoint", "artifacts", "earlyStop")
OPERATOR_FIELDS = tuple(
    alias
    for field in FineTuneJobStatus.model_fields.values()
    if (alias := field.alias) is not None and alias not in TRAINER_FIELDS
)
RUNNING_PROGRESS_FIELDS = ("eta", "etaSeconds", "imagesPerSecond")

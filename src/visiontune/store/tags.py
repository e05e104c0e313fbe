"""The tag vocabulary: every tag key visiontune writes on a run or reads back, named once.

A tag is how a later command finds a run (resume=last, visiontune-runs, a resumed sweep) or tells
one kind of run from another (a sweep's parent, an evaluation): a key spelt two ways would find
nothing, so modules use these names, never the strings.
"""

# --- every run ----------------------------------------------------------------------------------

ERROR = "error"  # why a run (or a sweep's parent) ended FAILED: the error's message, shortened
PROCESS = "visiontune.process"  # host:pid of the process writing the run, to tell a dead one's runs
NOTE = "mlflow.note.content"  # the run's description in MLflow's UI (an evaluation's summary)
PARENT_RUN = "mlflow.parentRunId"  # MLflow's own: the parent a nested run (a sweep's job) sits under

# Training runs are also tagged with their config groups' choices (model, mode, data, optimizer,
# scheduler), their lr and each key their command line overrode, under those very names
# (pipeline.run_tags): what the UI filters by, and what a leaderboard shows of a run that failed
# before it logged its params.
GROUPS = ("model", "mode", "data", "optimizer", "scheduler")
LR = "lr"

# --- resuming a training run ----------------------------------------------------------------------

CHECKPOINT = "visiontune.checkpoint"  # the folder of a run's checkpoints: a run without it cannot resume
# The run folder of the launch that trains the run; set at its start (before any checkpoint): how a
# torchrun restart finds the run its launch began.
OUTPUT_DIR = "visiontune.output_dir"
CONFIG_DIGEST = "visiontune.config_digest"  # what resume=last matches a run on (checkpoint.digest)
RESUME_COMMAND = "visiontune.resume_command"  # set on a run stopped early: the command that continues it

# --- how a training run ended -----------------------------------------------------------------------

EARLY_STOPPED = "visiontune.early_stopped"  # on a run early stopping ended: after which epoch, and why
BEST_WEIGHTS = "visiontune.best_weights"  # "weights" or "ema": which of the best epoch's the model is

# --- a learning-rate range test (visiontune-lr-find) -------------------------------------------------

LR_FIND = "visiontune.lr_find"  # "true": a range test's run, not a training run (it logs no model)

# --- a sweep --------------------------------------------------------------------------------------

SWEEP = "visiontune.sweep"  # "parent" on a sweep's parent run: not a training run of its own
JOB = "visiontune.job"  # a sweep child's overrides key: what a resumed sweep finds the child by
SWEEP_KEY = "sweep.key"  # on the parent: its overrides' key, what resume=last finds a stopped sweep by
SWEEP_VARIED = "sweep.varied"  # on the parent: the keys its jobs vary, comma-separated (leaderboard columns)
SWEEP_OVERRIDES = "sweep.overrides"  # on the parent: the sweep's command-line overrides, redacted
SWEEP_DIR = "sweep.dir"  # on the parent: the sweep's output folder (its jobs' logs and checkpoints)
SWEEP_CHILDREN = "sweep.children"  # on the ended parent: how many jobs it ran
SWEEP_FAILED = "sweep.failed"  # on the ended parent: how many of them did not finish
BEST_CHILD_RUN_ID = "best_child_run_id"  # on the ended parent: its best job's run id
BEST_CHILD = "best_child"  # on the ended parent: its best job's run name
CHAMPION = "champion"  # on the ended parent: models:/<name>@<alias> of the registered best model
CHAMPION_GATE = "champion_gate"  # on the ended parent: what the gate decided, with both scores

# --- a registered model version, scored by a sweep's champion gate (champion.py) ----------------

GATE_ACCURACY = "visiontune.gate.accuracy"  # its accuracy on the held-out folder below
GATE_DATA = "visiontune.gate.data"  # the folder both challenger and champion were scored on
GATE_DECISION = "visiontune.gate.decision"  # on the challenger: crowned, refused or forced, and why

# --- an evaluation (visiontune-evaluate) ----------------------------------------------------------

EVALUATES = "visiontune.evaluates"  # the model URI the run scores: an evaluation, not a training run
SOURCE_RUN = "visiontune.source_run"  # the run that trained that model
MODEL_ID = "visiontune.model_id"  # the logged model itself, wherever an alias points later
DATA = "visiontune.data"  # the folder of labelled images it was scored on

# --- an experiment (not a run) -----------------------------------------------------------------

EXPERIMENT_KIND = "mlflow.experimentKind"  # which view MLflow 3's UI opens it in (location.EXPERIMENT_KIND)

# --- a search (visiontune-search) -----------------------------------------------------------------

STUDY = "optuna.study"  # on the parent and each trial's run: the Optuna study's name
TRIAL = "optuna.trial"  # on a trial's run: its Optuna trial number (a re-queued trial's latest)
TRIAL_STATE = "optuna.state"  # on a trial's run: COMPLETE, PRUNED (FINISHED early, its epochs kept) or FAIL

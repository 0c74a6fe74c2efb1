"""The names of what a run directory holds, apart from the code that writes them: the
report reads a run with these and nothing heavier (``vlmtune report`` imports no torch)."""

CONFIG_FILE = "config.toml"  # the job as it ran, every default filled in
REPORT_FILE = "validation_report.json"  # the data's validation: kept, dropped and why
METRICS_FILE = "metrics.jsonl"  # one JSON object per logged step or eval
SUMMARY_FILE = "summary.json"  # the run's final numbers
EVALS_DIR = "evals"  # each eval's predictions, evals/step-N.jsonl
IMAGES_DIR = f"{EVALS_DIR}/images"  # small copies of the evaluated prompts' images
SETTINGS_FILE = "applied_settings.json"  # every setting changed before the run, and why

"""The built-in demo zoo: a tiny character-level Llama base, three skill experts, and their tasks.

Built by ``scripts/build_demo_zoo.py``; shipped as package data so the demo runs offline.
"""

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
MODELS_DIR = DEMO_DIR / "models"
TASKS_DIR = DEMO_DIR / "tasks"
DEMO_SPEC = DEMO_DIR / "search.yaml"
SKILLS = ("add", "reverse", "sort")
MODEL_NAMES = ("base", *SKILLS)


def model_path(name: str) -> Path:
    """Folder of one zoo model (``base``, ``add``, ``reverse`` or ``sort``)."""
    if name not in MODEL_NAMES:
        raise KeyError(f"no demo model {name!r}; choose from {', '.join(MODEL_NAMES)}")
    return MODELS_DIR / name


def task_name(skill: str) -> str:
    """lm-eval task name of one demo skill."""
    return f"demo_{skill}"

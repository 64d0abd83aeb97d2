"""lacvit_dist: distributed label-aware contrastive fine-tuning of Vision Transformers (LaCViT)."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def _pins(name: str) -> list[str]:
    lines = (HERE / "requirements" / name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


# Direct dependencies, each pinned to the version in requirements/lock.txt (the tested set).
_DIRECT = {"deepspeed", "webdataset", "timm", "submitit", "tensorboard", "fairscale", "pyyaml",
           "safetensors", "scikit-learn", "numpy", "pillow", "tqdm", "matplotlib"}
_LOCK = {line.split("==")[0].lower(): line for line in _pins("lock.txt")}
# Ranges, not the lock's pins, where the lent GPU machine has other versions (requirements/device.txt, rehearsed by
# `make test-device`): its torch 2.11 and huggingface_hub 1.33 at the bottom, the lock's at the top (`make setup`;
# torch from requirements/torch.txt); nothing newer has been tested.
_RANGES = ["torch>=2.11,<=2.14.1", "torchvision>=0.26,<=0.29.1", "huggingface_hub>=1.33,<=2.4.0"]

setup(
    name="lacvit_dist",
    version="0.1.0",
    description=__doc__,
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["lacvit_dist", "lacvit_dist.*", "launchers", "launchers.*"]),
    install_requires=_RANGES + sorted(_LOCK[name] for name in _DIRECT),
    extras_require={"test": [_LOCK["pytest"]], "dev": [_LOCK["pytest"]]},
    entry_points={"console_scripts": [
        "lacvit-train = lacvit_dist.cli:main",
        "lacvit-make-shards = lacvit_dist.data.make_shards:main",
        "lacvit-inspect-shards = lacvit_dist.data.inspect:main",
        "lacvit-fetch-weights = lacvit_dist.models.pretrained:main",
        "lacvit-evaluate = lacvit_dist.evaluation.offline:main",
        "lacvit-submit = launchers.submit:main",
    ]},
)

"""Lay out a serving copy of the model repository with instance counts taken from the environment.

Triton reads `instance_group { count }` from each config.pbtxt and cannot template it, so the
Triton container's entrypoint runs this before `tritonserver`:

    python3 set_instances.py /models /tmp/imagegen-models

`TRITON_INSTANCES_<MODEL>=N` (the model folder's name in upper case, other characters as `_`) sets
the count of every instance group of that model: e.g. TRITON_INSTANCES_DIFFUSION=2 runs two
diffusion instances (on each GPU, for GPU groups without `gpus`). Models without a variable keep
their config. Each model folder of the copy holds the config.pbtxt and links to everything else
in the source, so weights exported into the repository are not copied.

A variable that names no model, an ensemble (it has no instances) or a count that is not a
positive integer stops the container with a message, rather than serving something else.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

PREFIX = "TRITON_INSTANCES_"
# `instance_group [ ... ]` on one line, or over several up to a `]` that starts a line.
_GROUP = re.compile(
    r"^instance_group\s*\[[^\n]*\][ \t]*$|^instance_group\s*\[.*?^\]", re.MULTILINE | re.DOTALL
)
_COUNT = re.compile(r"\bcount\s*:\s*\d+")


class InstancesError(ValueError):
    pass


def env_name(model: str) -> str:
    return PREFIX + re.sub(r"[^A-Za-z0-9]", "_", model).upper()


def with_count(config: str, count: int) -> str:
    """`config` with every instance group's count set to `count`."""
    groups = list(_GROUP.finditer(config))
    if not groups:
        raise InstancesError("it has no instance_group (an ensemble has no instances of its own)")
    out, last = [], 0
    for group in groups:
        text = group.group(0)
        if text.count("{") != len(_COUNT.findall(text)):
            raise InstancesError("give each of its instance groups a `count:` to set")
        out += [config[last : group.start()], _COUNT.sub(f"count: {count}", text)]
        last = group.end()
    out.append(config[last:])
    return "".join(out)


def counts_from_env(models: list[str], environ: dict[str, str]) -> dict[str, int]:
    by_env = {env_name(m): m for m in models}
    counts: dict[str, int] = {}
    for name, raw in sorted(environ.items()):
        if not name.startswith(PREFIX):
            continue
        if name not in by_env:
            known = ", ".join(sorted(by_env))
            raise InstancesError(f"{name}: no model of that name in the repository ({known})")
        if not re.fullmatch(r"\s*[0-9]+\s*", raw) or int(raw) < 1:
            raise InstancesError(f"{name}={raw!r}: expected a whole number of instances >= 1")
        counts[by_env[name]] = int(raw)
    return counts


def lay_out(source: Path, target: Path, environ: dict[str, str]) -> dict[str, int]:
    """Build `target` from `source`; returns the counts that were set, by model."""
    models = sorted(p.name for p in source.iterdir() if (p / "config.pbtxt").is_file())
    if not models:
        raise InstancesError(f"{source} holds no model (no */config.pbtxt)")
    counts = counts_from_env(models, environ)
    configs = {}
    for model in models:  # every check before anything is written
        config = (source / model / "config.pbtxt").read_text()
        try:
            configs[model] = with_count(config, counts[model]) if model in counts else config
        except InstancesError as exc:
            raise InstancesError(f"{env_name(model)}: {model}: {exc}") from None
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for model, config in configs.items():
        folder = target / model
        folder.mkdir()
        (folder / "config.pbtxt").write_text(config)
        for entry in (source / model).iterdir():
            if entry.name != "config.pbtxt":
                (folder / entry.name).symlink_to(entry.resolve())
    return counts


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {Path(sys.argv[0]).name} SOURCE_REPOSITORY TARGET_REPOSITORY", file=sys.stderr)
        return 2
    try:
        counts = lay_out(Path(argv[0]), Path(argv[1]), dict(os.environ))
    except (InstancesError, OSError) as exc:
        print(f"set_instances: {exc}", file=sys.stderr)
        return 1
    for model, count in sorted(counts.items()):
        print(f"set_instances: {model}: {count} instance(s) per group")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

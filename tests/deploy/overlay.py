"""An operator's overlay, as docs/kubernetes.md tells them to write one: a shape of
deploy/kubernetes plus some of its components, rendered by the real `kubectl kustomize`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from harness import kube


def render_with(
    shape: str, components: list[str], out_dir: Path, tree: Path = kube.KUBERNETES_DIR
) -> kube.Rendered:
    overlay = out_dir / "my-imagegen"
    overlay.mkdir(parents=True, exist_ok=True)
    relative = os.path.relpath(tree, overlay)
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [f"{relative}/{shape}"],
                "components": [f"{relative}/{c}" for c in components],
            }
        )
    )
    return kube.render(out_dir, "my-imagegen", out_dir)


def only(rendered: kube.Rendered, keep: Any, out_dir: Path) -> kube.Rendered:
    """The objects of `rendered` for which keep(doc) is true, in a file of their own (for
    kubernetes-validate, which has no schema for custom resources)."""
    docs = [d for d in rendered.docs if keep(d)]
    path = out_dir / f"{rendered.name}-only.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return kube.Rendered(rendered.name, path, docs)

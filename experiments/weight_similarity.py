"""Are a suite's adapters alike in weights where they are alike in behaviour?

  python experiments/weight_similarity.py runs/suites/warm_start [runs/suites/full ...]

Per suite: the mean cosine similarity of two adapters' weights over the pairs of the same language
(other family), of the same family (other language) and of neither, for the flattened PEFT
factors (every lora_A / lora_B tensor) and for the flattened updates B A of every module (what SVD
K-means embeds); then the held-out losses the build measured (suite.json: an adapter on the
tasks of its own family in other languages vs of its own language in other families), i.e. how
alike they are in behaviour. The adapters are read from their safetensors files in float64.
"""

from __future__ import annotations

import itertools
import json
import os
import sys

import numpy as np


def adapter_vectors(adapters_dir: str, name: str) -> dict[str, np.ndarray]:
    """{"factors": every tensor flattened, sorted by key; "updates": B A of every module flattened}."""
    from safetensors.numpy import load_file

    w = {k: v.astype(np.float64) for k, v in
         load_file(os.path.join(adapters_dir, name, "adapter_model.safetensors")).items()}
    return {"factors": np.concatenate([w[k].ravel() for k in sorted(w)]),
            "updates": np.concatenate([(w[k.replace("lora_A", "lora_B")] @ w[k]).ravel()
                                       for k in sorted(w) if "lora_A" in k])}


def relation_cosines(root: str) -> dict[str, dict[str, float]]:
    """{what: {relation: mean cosine}} over the adapter pairs of each relation (task names are
    <family>_<language>)."""
    with open(os.path.join(root, "suite.json"), encoding="utf-8") as f:
        names = json.load(f)["tasks"]
    x = {n: adapter_vectors(os.path.join(root, "adapters"), n) for n in names}
    out: dict[str, dict[str, float]] = {}
    for what in ("factors", "updates"):
        sims: dict[str, list[float]] = {"same language": [], "same family": [], "neither": []}
        for a, b in itertools.combinations(names, 2):
            (fa, la), (fb, lb) = a.rsplit("_", 1), b.rsplit("_", 1)
            rel = "same language" if la == lb else "same family" if fa == fb else "neither"
            u, v = x[a][what], x[b][what]
            sims[rel].append(float(u @ v / np.linalg.norm(u) / np.linalg.norm(v)))
        out[what] = {rel: float(np.mean(s)) for rel, s in sims.items()}
    return out


def main(roots: list[str]) -> int:
    if not roots:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    print("| suite | weights | same language | same family | neither |")
    print("|---|---|---:|---:|---:|")
    quality = []
    for root in roots:
        for what, sims in relation_cosines(root).items():
            print(f"| {root} | {what} | {sims['same language']:.3f} | {sims['same family']:.3f} | "
                  f"{sims['neither']:.3f} |")
        with open(os.path.join(root, "suite.json"), encoding="utf-8") as f:
            q = json.load(f)["quality"]["summary"]
        quality.append(f"| {root} | {q['own_adapter_loss']:.3f} | {q['same_family_other_language_loss']:.3f} | "
                       f"{q['same_language_other_family_loss']:.3f} | {q['zero_shot_loss']:.3f} |")
    print()
    print("| suite | own adapter | same family, other language | same language, other family | zero-shot |")
    print("|---|---:|---:|---:|---:|")
    print("\n".join(quality))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The tune manifest: ``tune.json`` beside the artifacts of an export folder (pure Python, no numpy).

``vitdeploy tune`` (:mod:`vitdeploy.tune`) times every CPU candidate (backend x artifact x precision
hint) side by side, gates each on accuracy and writes this file; :func:`vitdeploy.runtimes.load` of
the folder then runs the chosen artifact with the chosen backend and options. The schema sits in
the core, beside the engine manifest, because the runtimes read it. This module is its one home:

``kind``, ``version``
    ``"vitdeploy-tune"`` and :data:`MANIFEST_VERSION`.
``chosen``
    :class:`Choice`: the candidate's ``name``, ``backend`` (``onnxruntime``/``openvino``), the
    ``artifact`` path relative to the folder, its ``sha256``, the runtime constructor ``options``
    (``inference_precision``, ``performance_hint``) and ``why`` (one sentence); ``None`` when
    no candidate passed the accuracy gate.
``candidates``
    one :class:`Candidate` per candidate, run or not: ``status`` ``ok`` (timed),
    ``unavailable`` (cannot run here; ``reason`` says why), ``skipped`` (not asked for), ``failed``
    (``reason``: the error) or
    ``dropped`` (timed, but outside the accuracy gate; ``reason`` names the measured value);
    ``latency_ms`` (batch -> median over rounds of the per-round p50), ``latency_rounds_ms`` (batch ->
    each round's p50), ``latency_spread`` (batch -> ``min``, ``p25``, ``median``, ``p75``, ``max`` of
    the rounds and ``iqr_over_median``), ``unstable`` (batch or ``"throughput"`` -> why that speed is
    unstable here: two modes or a wide spread), ``images_per_s`` (batch -> images/s from that latency),
    ``throughput`` (the backend's throughput mode: ``images_per_s``, ``batch``, ``mode``, and its
    ``spread`` over rounds) and ``accuracy``: ``kind`` ``labelled`` or ``agreement``, ``images``,
    ``source``, the ``primary`` output's figures at the top level (``cosine``, ``top1_agreement``,
    ``top5_agreement``, ``rel_max_error``; labelled: ``top1``, ``top1_drop_points`` ...), the
    ``precision`` whose parity gate sets the token thresholds, and ``outputs``: per output of the
    artifact its ``kind`` (``logits``, ``vector``, ``tokens``) and :class:`vitdeploy.parity.ParityMetrics`
    figures (tokens: ``token_cosine_min``, ``token_cosine_p1``, ``token_share_below`` under
    ``token_floor``, ``num_tokens``), the ``gate`` thresholds it was held to and its ``failures``.
``cpu``
    the CPU's model, usable CPUs, threads used and arithmetic ``flags`` (avx2, avx512_vnni, ...).
``gate``
    the ``rule`` in words, ``max_drop_points``, ``min_cosine``, ``min_top1_agreement``, ``accuracy_on``;
    ``outputs`` (output -> kind), ``min_token_cosine``/``max_token_share`` (``None``: each precision's
    parity gate) and ``token_gates`` (precision -> the per-token thresholds applied).
``objective``, ``batches``, ``rounds``, ``reference``, ``command``, ``created``, ``versions``,
``peer`` (OpenVINO + NNCF int8 when compared: its figures and the choice's latency ratio to it),
``load`` (load averages and other processes' CPUs while timing) and ``stability`` (the rule that
flags unstable candidates, and ``decision``: when the fastest was unstable, whether a steady one
within the margin was chosen instead, with both candidates' figures).

The manifest is written atomically (:func:`write_manifest`); :func:`read_manifest` refuses a file of
another kind or a version it cannot read (it reads version 1, whose spread and stability fields are
absent, with them empty; and version 2 files written before ``accuracy.outputs`` and the token fields of
``gate`` existed, whose accuracy is judged by the primary output alone, as it was then), and
:func:`chosen_artifact` refuses an artifact whose bytes changed since. The per-output fields were added
inside ``accuracy`` and ``gate`` (free-form mappings), so a reader of version 2 that predates them reads
the new files too.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vitdeploy.files import atomic_write_json, read_json, sha256_file

MANIFEST_NAME = "tune.json"
MANIFEST_KIND = "vitdeploy-tune"
MANIFEST_VERSION = 2
# Version 1 had no spread or stability fields: it reads with them empty (committed results, folders tuned before).
READABLE_VERSIONS = (1, MANIFEST_VERSION)
BACKENDS = ("onnxruntime", "openvino")
STATUSES = ("ok", "dropped", "unavailable", "skipped", "failed")


class TuneManifestError(ValueError):
    """The tune manifest is missing, malformed, or no longer matches the folder."""


@dataclass
class Choice:
    """What ``runtimes.load(folder)`` runs."""

    name: str
    backend: str
    artifact: str  # relative to the manifest's folder
    sha256: str
    options: dict[str, Any] = field(default_factory=dict)
    why: str = ""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise TuneManifestError(f"chosen backend {self.backend!r} is not one of {list(BACKENDS)}")


@dataclass
class Candidate:
    """One way to run the model here (a backend, an artifact ``graph`` and a precision hint) and,
    once tuned, its figures (see the module docstring for the fields). ``tune`` lists them with
    status ``ok`` (can run here) or ``unavailable`` and fills them in as it measures."""

    name: str
    backend: str
    graph: str  # which artifact: fp32 | int8 | int8-7bit | fp8
    precision: str  # what its matmuls compute in: fp32 | bf16 | int8 | fp8
    description: str
    status: str
    reason: str | None = None
    artifact: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)
    latency_rounds_ms: dict[str, list[float]] = field(default_factory=dict)
    latency_spread: dict[str, dict[str, float]] = field(default_factory=dict)
    unstable: dict[str, str] = field(default_factory=dict)  # batch (or "throughput") -> why its speed is unstable
    images_per_s: dict[str, float] = field(default_factory=dict)
    throughput: dict[str, Any] | None = None
    accuracy: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise TuneManifestError(f"candidate {self.name!r} has status {self.status!r}; expected one of {list(STATUSES)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TuneManifest:
    """The whole ``tune.json`` document."""

    chosen: Choice | None
    candidates: list[Candidate]
    cpu: dict[str, Any]
    gate: dict[str, Any]
    objective: str
    batches: list[int]
    rounds: int
    reference: str
    command: str = ""
    created: str = ""
    versions: dict[str, str | None] = field(default_factory=dict)
    peer: dict[str, Any] | None = None
    load: dict[str, Any] | None = None  # load averages and other processes' CPUs while timing
    stability: dict[str, Any] | None = None  # the rule, and the decision it made (or questioned)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {"kind": MANIFEST_KIND, "version": MANIFEST_VERSION, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "tune manifest") -> TuneManifest:
        if not isinstance(data, dict) or data.get("kind") != MANIFEST_KIND:
            raise TuneManifestError(f"{where} is not a vitdeploy tune manifest (kind {data.get('kind')!r}, "
                                    f"expected {MANIFEST_KIND!r})" if isinstance(data, dict) else
                                    f"{where} is not a JSON object")
        if data.get("version") not in READABLE_VERSIONS:
            raise TuneManifestError(f"{where} has version {data.get('version')!r}; this vitdeploy reads versions "
                                    f"{', '.join(map(str, READABLE_VERSIONS))}: run `vitdeploy tune` again")
        fields = {k: v for k, v in data.items() if k not in ("kind", "version")}
        try:
            chosen = Choice(**fields.pop("chosen")) if fields.get("chosen") else None
            fields.pop("chosen", None)
            candidates = [Candidate(**c) for c in fields.pop("candidates")]
            return cls(chosen=chosen, candidates=candidates, **fields)
        except (TypeError, KeyError) as error:
            raise TuneManifestError(f"{where} is malformed: {error}") from None


def manifest_path(folder: str | os.PathLike[str]) -> Path:
    """``FOLDER/tune.json``."""
    return Path(folder) / MANIFEST_NAME


def is_tuned_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder holding a tune manifest."""
    return Path(path).is_dir() and manifest_path(path).is_file()


def write_manifest(folder: str | os.PathLike[str], manifest: TuneManifest) -> Path:
    """Write ``FOLDER/tune.json`` atomically; returns its path."""
    target = manifest_path(folder)
    atomic_write_json(target, manifest.to_dict())
    return target


def read_manifest(folder: str | os.PathLike[str]) -> TuneManifest:
    """Read and check ``FOLDER/tune.json``."""
    path = manifest_path(folder)
    if not path.is_file():
        raise TuneManifestError(f"{str(folder)!r} has no {MANIFEST_NAME}; run `vitdeploy tune` on it first")
    return TuneManifest.from_dict(read_json(path, TuneManifestError), str(path))


def chosen_artifact(folder: str | os.PathLike[str], manifest: TuneManifest | None = None) -> tuple[Choice, Path]:
    """The choice and its artifact's path; refuses a folder without a choice or a changed artifact."""
    manifest = manifest or read_manifest(folder)
    if manifest.chosen is None:
        raise TuneManifestError(f"{manifest_path(folder)} records no choice: no candidate passed the accuracy gate "
                                f"{manifest.gate}; open an artifact file directly or tune with a looser "
                                "--max-accuracy-drop")
    choice = manifest.chosen
    path = Path(folder) / choice.artifact
    if not path.is_file():
        raise TuneManifestError(f"{manifest_path(folder)} chose {choice.artifact!r}, which is not in {str(folder)!r}")
    if sha256_file(path) != choice.sha256:
        raise TuneManifestError(f"{path} changed since `vitdeploy tune` measured it (sha256 differs); "
                                "run `vitdeploy tune` again")
    return choice, path

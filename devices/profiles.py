"""Device profiles: spec-sheet figures, each with its source, keyed by the name users type.

Figures come from ../shared/DEVICES.md. A source says where a figure comes from: a vendor
sheet, "press (secondary)" for a press or community copy of a vendor figure, "computed" for a
figure derived from others (memory type and bus width, sparse to dense, INT8 to FP16), and
"assumed" where nothing is published and a typical value stands in. Units: memory in GB as spec
sheets give it (binary: an "8 GB" board has 8 GiB), bandwidth in GB/s (1e9 bytes/s), peaks in
dense TOPS / TFLOPS.

Each profile names its device kind; which targets run there and on which engine class (whose
calibrated figures the estimator applies, ``devices/estimate.py``) is declared per target in
``runtimes/capabilities.py``.
"""
from __future__ import annotations

import functools
import os
import platform
import time
from dataclasses import dataclass, field

from runtimes.capabilities import (APPLE_GPU, ARM_BOARD, CPU, ENGINE_CLASSES, HOST, IPHONE, JETSON, JETSON_GPU,
                                   MAC, MEDIATEK, PHONE_NPU, SNAPDRAGON, engines_for)
from runtimes.errors import EdgeError

__all__ = ["APPLE_GPU", "CPU", "ENGINE_CLASSES", "JETSON_GPU", "PHONE_NPU"]
QUANTS = ("fp16", "int8", "int4", "fp8")


class ProfileError(EdgeError):
    """An unknown device profile, or a precision / target the device does not run."""


@dataclass(frozen=True)
class Sourced:
    """One figure and where it comes from. ``value`` None: not published."""

    value: float | None
    source: str


@dataclass(frozen=True)
class DeviceProfile:
    """A device's spec sheet as the estimator and planner need it.

    ``peak``: compute precision (fp16 | int8 | fp8 | fp4) -> dense TFLOPS / TOPS of the accelerator.
    ``precisions``: weight precisions the hardware really runs. ``kind``: the device kind
    (runtimes.capabilities) that decides ``targets``: edge-export target (onnx/qnn, onnx/ort,
    coreml, tensorrt) -> engine class. ``budget_share``: the share of RAM one app's model (weights
    + KV cache) may take.
    """

    name: str
    title: str
    memory_gb: Sourced
    bandwidth_gb_s: Sourced
    peak: dict[str, Sourced]
    precisions: tuple[str, ...]
    kind: str
    budget_share: Sourced
    missing_precision: str = ""
    notes: str = ""
    measured: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def budget_bytes(self) -> int:
        """Bytes a model (weights + KV cache) may take on this device."""
        return int(self.memory_gb.value * 2**30 * self.budget_share.value)

    @property
    def targets(self) -> dict[str, str]:
        """Target -> engine class, for every target that runs on this kind of device."""
        return {target: e.engine for target, e in engines_for(self.kind).items()}

    def engine_why(self, target: str) -> str:
        """Why ``target`` runs on the engine it does here (runtimes.capabilities)."""
        return engines_for(self.kind)[target].why

    @property
    def bandwidth_bytes_s(self) -> float:
        return self.bandwidth_gb_s.value * 1e9

    def peak_flops(self, compute_precision: str) -> float | None:
        """Published dense peak for a compute precision in FLOP/s (or OP/s), None when not published."""
        figure = self.peak.get(compute_precision)
        return figure.value * 1e12 if figure and figure.value else None

    def check_precision(self, precision: str) -> None:
        """Raise ProfileError naming the reason when the hardware does not run ``precision``."""
        if precision not in self.precisions:
            raise ProfileError(f"{self.name} does not run {precision}: {self.missing_precision or 'not supported'}")

    def engine(self, target: str) -> str:
        """The engine class a target runs on here; ProfileError listing the targets that do run."""
        if target not in self.targets:
            raise ProfileError(f"target {target} does not run on {self.name} (runs: {', '.join(self.targets)})")
        return self.targets[target]

    def to_dict(self) -> dict:
        fig = lambda s: {"value": s.value, "source": s.source}  # noqa: E731
        return {"name": self.name, "title": self.title, "memory_gb": fig(self.memory_gb),
                "bandwidth_gb_s": fig(self.bandwidth_gb_s), "peak": {k: fig(v) for k, v in self.peak.items()},
                "precisions": list(self.precisions), "kind": self.kind, "targets": dict(self.targets),
                "budget_share": fig(self.budget_share), "budget_bytes": self.budget_bytes,
                "missing_precision": self.missing_precision, "notes": self.notes, "measured": self.measured,
                **({"extra": self.extra} if self.extra else {})}


PROFILES: dict[str, DeviceProfile] = {}


def register_profile(profile: DeviceProfile) -> DeviceProfile:
    PROFILES[profile.name] = profile
    return profile


def get_profile(name: str) -> DeviceProfile:
    """A profile by name (``host`` is measured on first use); ProfileError lists the known names."""
    name = name.removeprefix("estimate:")
    if name == "host":
        return host_profile()
    if name not in PROFILES:
        raise ProfileError(f"unknown device profile '{name}' (known: {', '.join([*PROFILES, 'host'])}; "
                           "see `edge-export devices`)")
    return PROFILES[name]


def list_profiles(include_host: bool = True) -> list[DeviceProfile]:
    """Every registered profile, spec-sheet ones first, then ``host`` (measured now)."""
    return list(PROFILES.values()) + ([host_profile()] if include_host else [])


# ---- shared figures ---------------------------------------------------------------------
ANDROID_SHARE = Sourced(0.5, "assumed: Android keeps about half of RAM for the OS and other apps; "
                             "one app's model gets ~50%")
IOS_SHARE = Sourced(0.6, "assumed: an iOS app with the increased-memory-limit entitlement gets roughly "
                         "50-60% of RAM before jetsam (community reports)")
BOARD_SHARE = Sourced(0.75, "assumed: unified memory shared with a headless Linux and the runtime's "
                            "context; ~75% is left for one model")
MAC_SHARE = Sourced(0.75, "assumed: macOS caps the GPU working set near 75% of RAM "
                          "(Metal recommendedMaxWorkingSetSize)")
PHONE_FP8 = "no FP8: no phone NPU toolchain offers FP8; they use w4a16 / w8a16 / int4 weights"
APPLE_FP8 = "no FP8 on Apple's GPU or Neural Engine (the Neural Engine accelerates W8A8 int8; coremltools docs)"
ORIN_FP8 = ("Orin is Ampere (SM87): no native FP8, which needs SM89+; Orin runs FP16 / INT8 / INT4 "
            "(TensorRT Edge-LLM docs)")
CPU_FP8 = "no FP8 arithmetic on Arm / x86 CPUs (onnxruntime's CPU provider only dequantizes float8 weights)"
MOBILE_INT = ("fp16", "int8", "int4")
NOT_PUBLISHED = "not published"


def _phone(name, title, bandwidth, memory, npu, kind, share=ANDROID_SHARE, notes="", no_fp8=PHONE_FP8,
           qnn_soc=None):
    """``qnn_soc``: a Snapdragon's SoC id (runtimes.capabilities.QNN_SOCS), which qnn exports compile for."""
    return register_profile(DeviceProfile(name, title, memory, bandwidth, npu, MOBILE_INT, kind, share,
                                          no_fp8, notes, extra={"qnn_soc": qnn_soc} if qnn_soc else {}))


def _jetson(name, title, memory, bandwidth, int8, fp16, notes=""):
    return register_profile(DeviceProfile(name, title, memory, bandwidth, {"int8": int8, "fp16": fp16}, MOBILE_INT,
                                          JETSON, BOARD_SHARE, ORIN_FP8, notes))


_phone("snapdragon-8-gen3", "Qualcomm Snapdragon 8 Gen 3 (SM8650)",
       Sourced(76.8, "computed: LPDDR5X 9.6 Gbps x 64-bit bus (memory type: press)"),
       Sourced(12, "assumed: typical flagship phone (Galaxy S24 Ultra, OnePlus 12); the SoC takes up to 24 GB"),
       {"int8": Sourced(None, "Hexagon HTP v75: TOPS not published (Qualcomm AI Hub models README names v75)")},
       SNAPDRAGON, qnn_soc="SM8650")
_phone("snapdragon-8-elite", "Qualcomm Snapdragon 8 Elite (SM8750)", Sourced(84.8, "press (secondary)"),
       Sourced(12, "assumed: typical flagship phone; the SoC takes up to 24 GB (press, secondary)"),
       {"int8": Sourced(None, "Hexagon v79: TOPS not published")}, SNAPDRAGON, qnn_soc="SM8750")
_phone("snapdragon-x-elite", "Qualcomm Snapdragon X Elite (laptop)",
       Sourced(135, "Qualcomm product brief: LPDDR5X-8448, 135 GB/s (press, secondary)"),
       Sourced(16, "assumed: typical Copilot+ PC configuration"),
       {"int8": Sourced(45, "Hexagon NPU 45 TOPS INT8 (Qualcomm, press)")}, SNAPDRAGON,
       share=Sourced(0.75, "assumed: a Windows laptop leaves ~75% of RAM to one model"), qnn_soc="SC8380XP")
_phone("dimensity-9300", "MediaTek Dimensity 9300",
       Sourced(76.8, "computed: LPDDR5T 9.6 Gbps x 64-bit bus (memory type: press)"),
       Sourced(12, "assumed: typical flagship phone"), {"int8": Sourced(None, f"APU 790: TOPS {NOT_PUBLISHED}")},
       MEDIATEK, notes="no edge-export target for the MediaTek APU (NeuroPilot): onnx/ort on the CPU only")
_phone("dimensity-9400", "MediaTek Dimensity 9400",
       Sourced(85.6, "computed: LPDDR5X 10.7 Gbps x 64-bit bus (memory type: press)"),
       Sourced(12, "assumed: typical flagship phone"), {"int8": Sourced(None, f"NPU 890: TOPS {NOT_PUBLISHED}")},
       MEDIATEK, notes="no edge-export target for the MediaTek NPU (NeuroPilot): onnx/ort on the CPU only")

A17_BANDWIDTH = 51.2
APPLE_NE_35 = Sourced(35, "Neural Engine 35 TOPS, INT8 (press; W8A8 per coremltools docs); not used for "
                          "LLMs, which Core ML runs on the GPU here")
_phone("apple-a17-pro", "Apple A17 Pro (iPhone 15 Pro)",
       Sourced(A17_BANDWIDTH, "computed: LPDDR5-6400 x 64-bit; Apple does not publish it (whisper.cpp PR 2546 "
                              "measured ~22.5 GB/s memcpy)"),
       Sourced(8, "press"), {"int8": APPLE_NE_35, "fp16": Sourced(None, f"GPU FLOPS {NOT_PUBLISHED} by Apple")},
       IPHONE, share=IOS_SHARE, no_fp8=APPLE_FP8)
_phone("apple-a18-pro", "Apple A18 Pro (iPhone 16 Pro)",
       Sourced(round(A17_BANDWIDTH * 1.17, 1), "computed: A17 Pro's 51.2 GB/s x 1.17 ('17% more', press; "
                                               "absolute not published)"),
       Sourced(8, "press"), {"int8": APPLE_NE_35, "fp16": Sourced(None, f"GPU FLOPS {NOT_PUBLISHED} by Apple")},
       IPHONE, share=IOS_SHARE, no_fp8=APPLE_FP8)
for _name, _title, _bw, _mem, _ne, _gpu in (
        ("apple-m4", "Apple M4", Sourced(120, "press"),
         Sourced(16, "assumed: base Mac configuration since Oct 2024 (iPad Pro M4: 8 or 16 GB)"),
         Sourced(38, "Neural Engine 38 TOPS (press)"), Sourced(None, f"GPU FLOPS {NOT_PUBLISHED} by Apple")),
        ("apple-m1-max", "Apple M1 Max", Sourced(400, "Apple press (M1 Max: 400 GB/s)"),
         Sourced(32, "Apple press (base M1 Max configuration)"), Sourced(11, "Neural Engine 11 TOPS (Apple press)"),
         Sourced(10.4, "Apple press: 32-core GPU 10.4 TFLOPS (FP32; Apple GPUs run FP16 at the same rate)"))):
    register_profile(DeviceProfile(_name, _title, _mem, _bw, {"int8": _ne, "fp16": _gpu}, MOBILE_INT,
                                   MAC, MAC_SHARE, APPLE_FP8))

NANO_DS = "NVIDIA datasheet via Seeed wiki"
_jetson("jetson-orin-nano-8gb", "NVIDIA Jetson Orin Nano 8GB", Sourced(8, NANO_DS), Sourced(68, NANO_DS),
        Sourced(20, f"computed: 40 TOPS sparse INT8 / 2 ({NANO_DS})"),
        Sourced(10, f"~10 TFLOPS FP16, Ampere SM87 ({NANO_DS})"))
_jetson("jetson-orin-nano-super", "NVIDIA Jetson Orin Nano 8GB Super", Sourced(8, NANO_DS),
        Sourced(102, "NVIDIA (Super announcement)"),
        Sourced(33.5, "computed: 67 TOPS sparse INT8 / 2 (NVIDIA, Super announcement)"),
        Sourced(16.75, "computed: dense INT8 / 2 (Ampere tensor cores)"))
_jetson("jetson-orin-nx-16gb", "NVIDIA Jetson Orin NX 16GB", Sourced(16, "Seeed wiki"), Sourced(102.4, "Seeed wiki"),
        Sourced(50, "computed: 100 TOPS sparse INT8 / 2 (Seeed wiki; module total incl. DLAs; 157 in Super mode)"),
        Sourced(14.7, "computed: Orin Nano's ~10 TFLOPS FP16 x 918/625 MHz GPU clock (same 1024-core GPU; "
                      "clocks: NVIDIA module data sheets, secondary)"))
_jetson("jetson-agx-orin-64gb", "NVIDIA Jetson AGX Orin 64GB", Sourced(64, "NVIDIA tech brief (secondary)"),
        Sourced(204.8, "NVIDIA tech brief (secondary)"),
        Sourced(85, "computed: GPU's 170 TOPS sparse INT8 / 2 (275 with DLAs; tech brief, secondary)"),
        Sourced(42.5, "computed: GPU dense INT8 / 2 (Ampere tensor cores)"))
register_profile(DeviceProfile(
    "jetson-agx-thor", "NVIDIA Jetson AGX Thor (T5000)", Sourced(128, "quoted in TensorRT issue 4590"),
    Sourced(273, "quoted in TensorRT issue 4590"),
    {"fp8": Sourced(517, "517 TFLOPS dense FP8 (quoted in TensorRT issue 4590)"),
     "fp4": Sourced(1035, "1035 TFLOPS dense FP4 (quoted in TensorRT issue 4590)"),
     "fp16": Sourced(258.5, "computed: dense FP8 / 2 (Blackwell tensor cores)")},
    ("fp16", "int8", "int4", "fp8", "nvfp4"), JETSON, BOARD_SHARE,
    notes="TensorRT 10.13 was reported to fall back silently from FP8 to FP32 (TensorRT issue 4590): "
          "check the precision that actually ran"))
register_profile(DeviceProfile(
    "raspberry-pi-5", "Raspberry Pi 5 (8 GB)", Sourced(8, "assumed: the 8 GB model (4 / 8 / 16 GB sold; press)"),
    Sourced(17.1, "computed: LPDDR4X-4267 x 32-bit bus (press)"),
    {"fp16": Sourced(None, "4x Cortex-A76, no accelerator; CPU peak not published")}, MOBILE_INT,
    ARM_BOARD, BOARD_SHARE, CPU_FP8))


# ---- host: measured now ---------------------------------------------------------------------
def _meminfo_gb() -> float:
    """MemTotal from /proc/meminfo in GiB; 0 where there is none (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    except (OSError, StopIteration, ValueError):
        return 0.0
    return round(kb / 2**20, 1)


def probe_read_bandwidth(seconds: float = 0.5, mib: int = 64) -> float:
    """Read bandwidth of this machine in GB/s: the best of a few numpy sums over ``mib`` MiB, one
    thread, stopping after ``seconds`` (at most ~1 s with the allocation)."""
    import numpy as np
    data = np.ones(mib * 2**20 // 8, dtype=np.float64)
    best, stop = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < stop:
        t0 = time.perf_counter()
        data.sum()
        best = max(best, data.nbytes / (time.perf_counter() - t0))
    return round(best / 1e9, 1)


@functools.cache
def host_profile() -> DeviceProfile:
    """This machine: cores from os.cpu_count, RAM from /proc/meminfo, bandwidth probed (<= 1 s)."""
    cpus = os.cpu_count() or 1
    return DeviceProfile(
        "host", f"this machine ({platform.machine()}, {cpus} CPUs)",
        Sourced(_meminfo_gb(), "measured: /proc/meminfo MemTotal"),
        Sourced(probe_read_bandwidth(), "measured: numpy read of 64 MiB, one thread (an achieved rate, not a peak)"),
        {"fp16": Sourced(None, "CPU peak not measured")}, MOBILE_INT, HOST,
        BOARD_SHARE, CPU_FP8, measured=True, extra={"cpus": cpus})


def render_profiles(profiles: list[DeviceProfile]) -> str:
    """A compact table of profiles for a terminal (`edge-export devices`); sources are in ``--json``."""
    lines = [f"{'device':24s} {'RAM GB':>6s} {'budget GiB':>10s} {'GB/s':>6s} {'precisions':24s} targets"]
    for p in profiles:
        lines.append(f"{p.name:24s} {p.memory_gb.value:6g} {p.budget_bytes / 2**30:10.1f} "
                     f"{p.bandwidth_gb_s.value:6g} {','.join(p.precisions):24s} "
                     + ", ".join(f"{t} ({engine})" for t, engine in p.targets.items()))
    lines.append("(figures and their sources: `edge-export devices --json`; use a name with "
                 "`plan --device NAME` or `bench --device estimate:NAME`)")
    return "\n".join(lines)

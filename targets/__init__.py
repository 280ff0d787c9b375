"""Deployment targets: hardware facts as TOML data files, loaded into frozen `Target` objects.

Hardware facts live only here. Passes ask ``target.supports(Precision.FP8_E4M3)`` or call
``target.require(...)``; they never compare target names.

A target file (``targets/data/<name>.toml``, or a user's own file given by path) holds:

==========================  ========================================================  ========
key                         meaning                                                   required
==========================  ========================================================  ========
``name``                    short lowercase id, e.g. ``"h100"``                       yes
``display_name``            human name, e.g. ``"NVIDIA H100 SXM5 80GB"``               yes
``vendor``                  e.g. ``"nvidia"``                                          yes
``compute_capability``      CUDA compute capability as a string, e.g. ``"9.0"``;       GPUs
                            absent or ``""`` makes the target a CPU
``memory_gb``               device memory in GB; ``0`` on a CPU means "host memory,    yes
                            measured at run time"
``memory_bandwidth_gbs``    peak memory bandwidth in GB/s                              yes
``[peak_tflops]``           dense (no sparsity) peak per precision: fp32, tf32, fp16,  yes
                            bf16, fp8, int8, int4, fp4 (TOPS for integers); leave an
                            entry out when the figure is unknown
``default_backend``         a backend of fdec.backends: ``onnxruntime``,              yes
                            ``tensorrt`` or ``tensorrt-rtx``
``[default_recipe]``        ``weights``, ``activations``, ``kv_cache``: a precision    yes
                            name, optionally with a method suffix (``"int4-awq"``);
                            optional ``encoder_weights`` for encoder models (BERT)
``sparse_tensor_cores``     2:4 structured sparsity in hardware (needs cc >= 8.0)      yes
``sources``                 where each figure comes from (title and URL)               no
``node_launch_us``          host cost per graph node of one decode step under ONNX     no
                            Runtime's CUDA provider, in µs (the roofline's per-step
                            floor); 0 or absent: no floor
==========================  ========================================================  ========

Which precisions a target supports is derived from its compute capability, never listed per
file: fp32, fp16, int8 and int4 on every GPU; tf32 and bf16 from 8.0; fp8 from 8.9; fp4 from
10.0. A CPU target supports fp32, int8 and int4.

Every problem with a name or a file is reported as `fdec.errors.InputError` naming the file,
the field and the fix; nothing else escapes.

Modules: target (the Target class), precision (precisions by compute capability), load
(bundled targets by name, user files by path), validate (a file's fields checked), host (this
machine's CPU facts), messages (how errors name values).
"""

from __future__ import annotations

from fdec.targets.load import list_targets, load_target, target_names
from fdec.targets.precision import Precision
from fdec.targets.target import Target
from fdec.targets.validate import BACKENDS

__all__ = [
    "BACKENDS",
    "Precision",
    "Target",
    "list_targets",
    "load_target",
    "target_names",
]

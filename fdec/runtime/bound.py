"""Decode steps over ONNX Runtime's IOBinding on the session's device: the KV cache in bound OrtValues."""

from __future__ import annotations

from typing import Any

import numpy as np

from fdec.runtime.ort import GPU_PROVIDERS, require_onnxruntime

__all__ = ["BoundDecoder"]


class BoundDecoder:
    """Decoder steps through ONNX Runtime's IOBinding: the KV cache stays in OrtValues.

    With a shared-buffer build, each KV tensor is one [batch, kv_heads, max_length, head_dim]
    OrtValue bound as both past and present, so GroupQueryAttention appends in place and no
    step copies the cache. Otherwise the present OrtValues of one step are bound as the next
    step's past (the graph still concatenates, but nothing goes through numpy).
    Input ids and positions of decode steps, and their logits, use reused OrtValues too.

    Everything is bound on the session's device ("cuda" when its first provider is a GPU one,
    else "cpu"): the same code runs both. `static` (shared-buffer builds only) gives decode
    steps fixed shapes and addresses, as CUDA graphs need: the attention mask of decode steps
    is one [batch, max_length] buffer (ones up to the current length: GroupQueryAttention takes
    each row's length from the positions and the buffer's length from the mask's width), the
    logits one device buffer. When the session captures
    CUDA graphs (OrtModel.cuda_graph), decode steps run as graph 1 and the prefill outside
    any graph. Every step ends with the device synchronised (its logits copied to the host),
    so timings around `step` are device time.
    """

    def __init__(
        self,
        model: Any,
        batch: int,
        max_length: int,
        *,
        static: bool = False,
        graph_id: int = 1,
    ):
        ort = require_onnxruntime()

        if not model.num_layers:
            raise ValueError("BoundDecoder needs a decoder with past_key_values inputs")
        self.model = model
        self.batch = batch
        self.max_length = max_length
        self.length = 0  # positions in the cache
        self._ort = ort
        self._binding = model.session.io_binding()
        providers = model.providers
        self._device = "cuda" if providers and providers[0] in GPU_PROVIDERS else "cpu"
        self.static = static and model.shares_kv_buffer
        self.cuda_graph = self.static and model.cuda_graph
        self.graph_id = graph_id
        self._run_options: dict[int, Any] = {}
        # static: zeros past the current length; else sliced to the length each step
        self._mask = np.zeros if self.static else np.ones
        self._mask = self._mask((batch, max_length), dtype=np.int64)
        self._mask_value = (
            ort.OrtValue.ortvalue_from_numpy(self._mask, self._device, 0) if self.static else None
        )
        self._step_ids: Any = None  # [batch, 1] OrtValues, created at the first decode step
        self._step_positions: Any = None
        self._step_logits: Any = None
        self._step_array: np.ndarray | None = None  # the CPU memory of _step_logits
        self._past: list[Any]
        self._output_index: dict[str, int] = {}
        if model.shares_kv_buffer:
            shape = (batch, model.kv_heads, max_length, model.head_dim)
            # One array each: on the CPU an OrtValue wraps the numpy memory it is given.
            self._past = [
                model.kv_ortvalue(np.zeros(shape, dtype=model.kv_dtype), self._device)
                for _ in range(2 * model.num_layers)
            ]
        else:
            empty = model.empty_past(batch)
            self._past = [model.kv_ortvalue(a, self._device) for a in empty]
        for index, name in enumerate(self._past_names()):
            self._binding.bind_ortvalue_input(name, self._past[index])
        self._bind_presents()

    def reset(self) -> None:
        """Start a new sequence in the same buffers (the cache's old positions are never read:
        the attention reads lengths from the positions bound each step)."""
        self.length = 0
        if self.static:
            self._mask[:] = 0

    def _graph(self, graph_id: int) -> Any:
        """RunOptions naming the CUDA graph a run captures or replays (-1: none)."""
        if graph_id not in self._run_options:
            options = self._ort.RunOptions()
            options.add_run_config_entry("gpu_graph_id", str(graph_id))
            self._run_options[graph_id] = options
        return self._run_options[graph_id]

    def _past_names(self) -> list[str]:
        return [
            f"past_key_values.{i}.{kv}"
            for i in range(self.model.num_layers)
            for kv in ("key", "value")
        ]

    def _present_names(self) -> list[str]:
        return [
            f"present.{i}.{kv}" for i in range(self.model.num_layers) for kv in ("key", "value")
        ]

    def _bind_presents(self) -> None:
        for index, name in enumerate(self._present_names()):
            if self.model.shares_kv_buffer:
                self._binding.bind_ortvalue_output(name, self._past[index])
            else:
                self._binding.bind_output(name, self._device)
            self._output_index.setdefault(name, len(self._output_index))

    def _bind_logits(self, value: Any = None) -> None:
        # IOBinding lists outputs in first-binding order; rebinding a name keeps its place.
        if value is None:
            self._binding.bind_output("logits", "cpu")
        else:
            self._binding.bind_ortvalue_output("logits", value)
        self._output_index.setdefault("logits", len(self._output_index))

    def step(self, input_ids: np.ndarray) -> np.ndarray:
        """Logits [batch, seq, vocab] for `input_ids` [batch, seq] after the cached positions."""
        ort, binding, model = self._ort, self._binding, self.model
        batch, seq = input_ids.shape
        end = self.length + seq
        if end > self.max_length:
            raise ValueError(f"sequence of {end} positions exceeds the buffer's {self.max_length}")
        positions = np.arange(self.length, end, dtype=np.int64)
        if seq == 1:
            # Decode step: update reused [batch, 1] inputs in place, logits into one buffer.
            if self._step_ids is None:
                self._step_ids = ort.OrtValue.ortvalue_from_numpy(
                    np.zeros((batch, 1), np.int64), self._device, 0
                )
                self._step_positions = ort.OrtValue.ortvalue_from_numpy(
                    np.zeros((batch, 1), np.int64), self._device, 0
                )
                vocab = model.session.get_outputs()[model.output_names.index("logits")].shape[-1]
                if isinstance(vocab, int) and self._device == "cpu":
                    # On the CPU the OrtValue writes into this array: no output to fetch.
                    self._step_array = np.empty((batch, 1, vocab), np.float32)
                    self._step_logits = ort.OrtValue.ortvalue_from_numpy(self._step_array)
                elif isinstance(vocab, int) and self.static:  # one device buffer, fixed address
                    self._step_logits = ort.OrtValue.ortvalue_from_shape_and_type(
                        (batch, 1, vocab), np.float32, self._device, 0
                    )
            self._step_ids.update_inplace(np.ascontiguousarray(input_ids, dtype=np.int64))
            self._step_positions.update_inplace(np.broadcast_to(positions, (batch, 1)).copy())
            binding.bind_ortvalue_input("input_ids", self._step_ids)
            if "position_ids" in model._inputs:
                binding.bind_ortvalue_input("position_ids", self._step_positions)
            self._bind_logits(self._step_logits)
        else:
            binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
            if "position_ids" in model._inputs:
                binding.bind_cpu_input(
                    "position_ids", np.broadcast_to(positions, (batch, seq)).copy()
                )
            self._bind_logits()
        if "attention_mask" in model._inputs:
            if self.static:
                self._mask[:, self.length : end] = 1
            if self.static and seq == 1:
                self._mask_value.update_inplace(self._mask)
                binding.bind_ortvalue_input("attention_mask", self._mask_value)
            else:
                # The prefill (outside any CUDA graph) gets the mask of its length: the fused
                # graph reads GroupQueryAttention's total length from the mask's width, and a
                # prompt of several tokens must be the whole sequence (or batch 1).
                binding.bind_cpu_input("attention_mask", np.ascontiguousarray(self._mask[:, :end]))
        if self.cuda_graph:  # decode steps replay graph 1; the prefill runs outside graphs
            model.session.run_with_iobinding(
                binding, self._graph(self.graph_id if seq == 1 else -1)
            )
        else:
            model.session.run_with_iobinding(binding)
        if self._device != "cpu":
            binding.synchronize_outputs()
        self.length = end
        if seq == 1 and model.shares_kv_buffer and self._step_array is not None:
            # Everything was written in place (cache and logits): nothing to collect.
            return self._step_array.copy()
        if seq == 1 and self.static and self._step_logits is not None:
            return self._step_logits.numpy()  # the device buffer, copied to the host
        outputs = binding.get_outputs()
        where = self._output_index
        if not model.shares_kv_buffer:
            # This step's presents are the next step's past: rebind without leaving ORT.
            for index, name in enumerate(self._present_names()):
                self._past[index] = outputs[where[name]]
            for index, name in enumerate(self._past_names()):
                binding.bind_ortvalue_input(name, self._past[index])
            self._bind_presents()  # fresh outputs: a run fills bound outputs it allocated
        return outputs[where["logits"]].numpy()

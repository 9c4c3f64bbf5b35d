"""A Core ML export verified off macOS: the saved ML Program interpreted op by op in numpy.

Core ML predicts only on macOS. Elsewhere this reads the package as saved (``model.mlpackage``:
the program's proto and weights/weight.bin) and evaluates its main function's ops in order, with
numpy kernels (coreml_kernels.py): it checks the program's wiring and its stored weights, whichever
way the program was made (the MIL builder, or the traced torch conversion). Float16 ops are
evaluated in float32; the KV cache states are float16, as Core ML holds them.

Memory stays near one layer's weights whatever the model's size:
- a var is dropped after its last use; a constexpr (or blob const) is decompressed from the file
  when an op needs it and dropped after its last use (read, not mapped: mapped pages count as
  resident); a ``linear`` over a compressed weight runs a block of rows at a time, and a ``gather``
  from one decompresses only the rows it gathers (an embedding of 152k rows: the prompt's tokens);
- states are updated in place (no copy of the KV cache per op) in buffers that only grow as
  positions are written (``np.zeros`` pages are not resident until touched);
- several sequences run through the program together, op by op, each with its own states: a
  weight is decompressed once a pass for all of them.
Models whose float32 weights fit HOLD_BYTES keep them decompressed instead (speed, small models).

The program returns the last position's logits only, so the scorer runs it as a device would:
prefill the prompt, then one decode step per token (teacher forcing feeds the reference's tokens).
"""
from __future__ import annotations

import ctypes
import glob
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import ExportError
from ..verify import log_softmax
from .coreml_kernels import COMPUTE_TYPES, CONSTEXPRS, KERNELS, LAZY, STORED_TYPES, Blob, _slices, unpack_bits

WEIGHTS_DIR = "Data/com.apple.CoreML/weights"
BLOCK_ELEMENTS = 1 << 20  # a streamed weight's rows per block: 4 MB of float32 (a 7B gate_proj: 2.0 ns a weight
# decompressed and multiplied, against 3.3 at 16 MB blocks)
HOLD_BYTES = 1 << 30
STATE_OPS = ("read_state", "write_state", "coreml_update_state")


class Op:
    def __init__(self, proto, resolve):
        self.type, self.outputs = proto.type, [o.name for o in proto.outputs]
        self.name = proto.attributes["name"].immediateValue.tensor.strings.values[0] \
            if "name" in proto.attributes else (self.outputs or ["?"])[0]
        self.args: dict[str, list] = {}  # input -> its arguments: var names (str) or values
        self.tuples = set()
        for key, binding in proto.inputs.items():
            args = [a.name if a.name else resolve(a.value, f"{self.name}.{key}") for a in binding.arguments]
            self.args[key] = args
            if len(args) > 1 or key == "values":
                self.tuples.add(key)

    def names(self):
        return [a for args in self.args.values() for a in args if isinstance(a, str)]


class Program:
    """The main function of a saved package: its ops, constants (lazy where they are blobs or
    constexprs), inputs, states and outputs, and where each var is used last."""

    def __init__(self, package: Path):
        import coremltools as ct

        self.package = Path(package)
        spec = ct.utils.load_spec(str(self.package))
        if not spec.HasField("mlProgram") or "main" not in spec.mlProgram.functions:
            raise ExportError(f"{package}: not an ML Program with a main function")
        function = spec.mlProgram.functions["main"]
        block = function.block_specializations[function.opset]
        self.inputs, self.states = {}, {}
        for value in function.inputs:
            kind = value.type.WhichOneof("type")
            tensor = value.type.stateType.wrappedType.tensorType if kind == "stateType" else value.type.tensorType
            if kind == "stateType":
                self.states[value.name] = tuple(d.constant.size for d in tensor.dimensions)
            else:
                self.inputs[value.name] = COMPUTE_TYPES[_type_name(tensor.dataType)]
        self.outputs = list(block.outputs)
        self.consts: dict[str, object] = {}
        self.ops: list[Op] = []
        for proto in block.operations:
            if proto.blocks:
                raise ExportError(f"{package}: op {proto.type} has nested blocks, which the interpreter does not run")
            if proto.type == "const":
                self.consts[proto.outputs[0].name] = self._value(proto.attributes["val"], proto.outputs[0].name)
                continue
            op = Op(proto, self._value)
            if proto.type in CONSTEXPRS:
                args = {k: self._const_arg(v[0], op) for k, v in op.args.items()}
                self.consts[op.outputs[0]] = CONSTEXPRS[proto.type](args)
                continue
            if proto.type not in KERNELS and proto.type not in STATE_OPS:
                raise ExportError(f"{package}: op '{proto.type}' ({op.name}) is not one the ML Program interpreter "
                                  "evaluates; verify this package on macOS with Core ML, or add its kernel to "
                                  "edge_export/targets/coreml_kernels.py")
            self.ops.append(op)
        self.last_use: dict[str, int] = {}
        for i, op in enumerate(self.ops):
            for name in op.names():
                self.last_use[name] = i
        for name in self.outputs:
            self.last_use[name] = len(self.ops)
        self.free_at: list[list[str]] = [[] for _ in self.ops]
        for name, i in self.last_use.items():
            if i < len(self.ops) and name not in self.states:
                self.free_at[i].append(name)

    def _const_arg(self, arg, op: Op):
        if not isinstance(arg, str):
            return arg
        if arg not in self.consts:
            raise ExportError(f"{self.package}: {op.type} {op.name} reads {arg}, which is not a constant")
        return self.consts[arg]

    def _value(self, value, what: str):
        """A proto Value: an immediate (numpy, in the compute type) or a Blob in weight.bin."""
        tensor = value.type.tensorType
        name = _type_name(tensor.dataType)
        shape = tuple(d.constant.size for d in tensor.dimensions)
        if value.HasField("blobFileValue"):
            path = self.package / WEIGHTS_DIR / value.blobFileValue.fileName.split("/")[-1]
            return Blob(path, int(value.blobFileValue.offset), name, shape, f"{self.package}: {what}")
        t = value.immediateValue.tensor
        field = t.WhichOneof("value")
        if name == "STRING":
            values = list(t.strings.values)
            return values[0] if not shape else np.array(values)
        if field == "bytes":
            raw = np.frombuffer(t.bytes.values, np.uint8)
            stored, bits = STORED_TYPES[name]
            count = int(np.prod(shape))
            data = unpack_bits(raw, bits, count, name == "INT4") if bits < 8 else raw.view(stored)
        else:
            data = np.array(list(getattr(t, field).values))
        return data.astype(COMPUTE_TYPES[name]).reshape(shape)


def _type_name(code: int) -> str:
    from coremltools.proto import MIL_pb2
    name = MIL_pb2.DataType.Name(code)
    if name not in COMPUTE_TYPES and name != "STRING":
        raise ExportError(f"the ML Program has a value of type {name}, which the interpreter does not evaluate")
    return name


class Interpreter:
    """Runs a Program over a batch of sequences, op-major; each sequence has its own states."""

    def __init__(self, package: Path, hold: bool | None = None, block_elements: int = BLOCK_ELEMENTS):
        self.program = p = Program(package)
        lazy = sum(v.nbytes for v in p.consts.values() if isinstance(v, LAZY))
        self.hold = lazy <= HOLD_BYTES if hold is None else hold
        self.block_elements = block_elements
        self.held: dict[str, np.ndarray] = {}  # decompressed consts: for this pass, or for good when held

    def new_states(self) -> dict[str, np.ndarray]:
        """Zeroed float16 states; untouched pages of np.zeros are not resident."""
        return {name: np.zeros(shape, np.float16) for name, shape in self.program.states.items()}

    def run(self, inputs: list[dict], states: list[dict]) -> list[dict]:
        """One call of the program for each sequence: inputs[j] by name, states[j] updated in place;
        returns each sequence's outputs."""
        p, op = self.program, None
        envs = []
        for given, state in zip(inputs, states):
            env = {name: np.asarray(given[name]).astype(dtype) for name, dtype in p.inputs.items()}
            env.update(state)
            envs.append(env)
        try:
            for i, op in enumerate(p.ops):
                self._op(i, op, envs, states)
                for name in p.free_at[i]:
                    for env in envs:
                        env.pop(name, None)
                    if not self.hold:
                        self.held.pop(name, None)
        except ExportError:
            raise
        except Exception as e:
            where = f"op {op.type} {op.name}" if op is not None else "its inputs"
            raise ExportError(f"{p.package}: {where} failed in the interpreter: {e}") from e
        finally:
            if not self.hold:
                self.held.clear()
        return [{name: env[name] for name in p.outputs} for env in envs]

    # ---- arguments ---------------------------------------------------------------------------
    def _arg(self, env, arg, dense: bool = True):
        if not isinstance(arg, str):
            return arg.value() if dense and isinstance(arg, LAZY) else arg
        if arg in env:
            return env[arg]
        value = self.program.consts.get(arg)
        if value is None and arg not in self.program.consts:
            raise ExportError(f"{self.program.package}: var {arg} is read before it is written")
        if isinstance(value, LAZY) and (dense or arg in self.held):
            if arg not in self.held:
                self.held[arg] = value.value()
            return self.held[arg]
        return value

    def _args(self, op: Op, env, dense: bool = True) -> dict:
        return {key: [self._arg(env, a, dense) for a in args] if key in op.tuples else self._arg(env, args[0], dense)
                for key, args in op.args.items()}

    # ---- ops ---------------------------------------------------------------------------------
    def _op(self, i: int, op: Op, envs: list[dict], states: list[dict]) -> None:
        batched = {"linear": self._linear, "gather": self._gather}.get(op.type)
        if batched is not None and self._constant_table(op, envs[0]):
            for env, out in zip(envs, batched(op, envs)):
                env[op.outputs[0]] = out
            return
        shared = None
        for env, state in zip(envs, states):
            if op.type in STATE_OPS or op.type == "slice_update":
                out = self._state_op(i, op, env, state)
            elif shared is not None:
                out = shared
            else:
                out = KERNELS[op.type](self._args(op, env))
                if not any(a in env for a in op.names()):
                    shared = out  # computed from constants only: the same for every sequence
            if op.outputs:
                for name, value in zip(op.outputs, out if isinstance(out, tuple) else (out,)):
                    env[name] = value

    def _constant_table(self, op: Op, env) -> bool:
        """A linear whose weight, or a gather (axis 0) whose table, is a constant: run batched."""
        arg = op.args["weight" if op.type == "linear" else "x"][0]
        if isinstance(arg, str) and arg in env:
            return False
        if op.type == "linear":
            return True
        value = self._arg(env, arg, dense=False)
        axis = op.args.get("axis", [np.int32(0)])[0]
        return isinstance(value, LAZY) and int(np.asarray(self._arg(env, axis))) == 0 \
            and not self.hold and int(np.asarray(self._arg(env, op.args.get("batch_dims", [0])[0]))) == 0

    def _linear(self, op: Op, envs: list[dict]) -> list[np.ndarray]:
        """y = x W^T + b for every sequence in one product (their rows stacked); a compressed W not
        held is read and decompressed a block of rows at a time."""
        weight = self._arg(envs[0], op.args["weight"][0], dense=self.hold)
        xs = [np.asarray(self._arg(env, op.args["x"][0]), np.float32) for env in envs]
        n, k = weight.shape
        flat = np.concatenate([x.reshape(-1, k) for x in xs])
        if isinstance(weight, LAZY):
            out = np.empty((flat.shape[0], n), np.float32)
            step = max(1, self.block_elements // k)
            for start in range(0, n, step):
                rows = weight.rows(start, min(n, start + step))
                np.matmul(flat, rows.T, out=out[:, start:start + rows.shape[0]])
        else:
            out = flat @ np.asarray(weight, np.float32).T
        if "bias" in op.args:
            out += np.asarray(self._arg(envs[0], op.args["bias"][0]), np.float32)
        sizes = np.cumsum([x.size // k for x in xs])[:-1]
        return [part.reshape(x.shape[:-1] + (n,)) for part, x in zip(np.split(out, sizes), xs)]

    def _gather(self, op: Op, envs: list[dict]) -> list[np.ndarray]:
        """Rows of a compressed table (axis 0): only the rows some sequence gathers are decompressed."""
        table = self._arg(envs[0], op.args["x"][0], dense=False)
        indices = [np.asarray(self._arg(env, op.args["indices"][0])).astype(np.int64) for env in envs]
        indices = [np.where(ix < 0, ix + table.shape[0], ix) for ix in indices]
        used, where = np.unique(np.concatenate([ix.reshape(-1) for ix in indices]), return_inverse=True)
        rows = table.take(used)
        out, start = [], 0
        for ix in indices:
            out.append(rows[where[start:start + ix.size]].reshape(ix.shape + rows.shape[1:]))
            start += ix.size
        return out

    def _state_op(self, i: int, op: Op, env: dict, state: dict):
        """read_state returns the state's own buffer; write_state / coreml_update_state copy into it
        (nothing to copy when the value is that buffer); slice_update on the buffer at its last use
        writes in place. Before the buffer changes, any other live view of it is copied."""
        a = op.args
        if op.type == "read_state":
            return state[a["input"][0]]
        if op.type == "slice_update":
            x_name = a["x"][0]
            current = env.get(x_name) if isinstance(x_name, str) else None
            buffer = next((b for b in state.values() if current is b), None)
            if buffer is None or self.program.last_use.get(x_name) != i:
                return KERNELS["slice_update"](self._args(op, env))
            args = self._args(op, env)
            self._protect(env, buffer, keep=x_name)
            buffer[_slices(args, buffer.shape)] = args["update"]
            return buffer
        name = a["input" if op.type == "write_state" else "state"][0]
        buffer = state[name]
        value = self._arg(env, a["data" if op.type == "write_state" else "value"][0])
        if value is not buffer:
            self._protect(env, buffer, keep=None)
            buffer[...] = value
        return buffer if op.type == "coreml_update_state" else ()

    def _protect(self, env: dict, buffer: np.ndarray, keep) -> None:
        for name, value in env.items():
            if (name != keep and name not in self.program.states and isinstance(value, np.ndarray)
                    and np.may_share_memory(value, buffer)):
                env[name] = value.copy()


class ProgramScorer:
    """The interpreted program as the candidate of verify.compare, run as a device runs it:
    prefill, then one decode step per token, ``batch`` sequences through each pass together.

    Teacher forcing feeds the reference's continuation token by token; greedy decoding reuses it:
    until the first position where the program's argmax leaves the reference's continuation, its
    own greedy run has the very same context (and the same calls, so LongRoPE switches factors at
    the same step), so it picks the same tokens; it decodes on from there. verify.compare, which
    wants only that common prefix, reads it off teacher forcing and does not call greedy at all.
    """

    verified_with = "ML Program interpreted in numpy"
    greedy_from_forcing = True  # compare reads the greedy match off teacher forcing (verify.RuntimeScorer)

    def __init__(self, package: Path, max_context: int, hold: bool | None = None, batch: int = 8,
                 threads: int | None = None):
        self.interpreter = Interpreter(package, hold=hold)
        self.max_context, self.batch = int(max_context), int(batch)
        self.threads = int(threads or 1)
        self._forced: dict[tuple, tuple[list[int], np.ndarray]] = {}

    # ---- the program over several sequences -------------------------------------------------
    def _start(self, count: int) -> list[dict]:
        return [{"states": self.interpreter.new_states(), "position": 0} for _ in range(count)]

    def _call(self, sequences: list[dict], tokens: list[list[int]]) -> np.ndarray:
        """Append tokens[j] to sequence j (one program call each, all in one pass); logits [B, vocab]."""
        from runtimes.backends.coreml import causal_mask
        inputs = []
        for seq, ids in zip(sequences, tokens):
            inputs.append({"input_ids": np.asarray([ids], np.int32),
                           "causal_mask": causal_mask(seq["position"], len(ids), self.max_context)})
            seq["position"] += len(ids)
        with blas_threads(self.threads):
            outs = self.interpreter.run(inputs, [seq["states"] for seq in sequences])
        return np.stack([np.asarray(o["logits"], np.float32).reshape(-1) for o in outs])

    def _fed(self, prefixes: list[list[int]], feeds: list[list[int]]) -> list[np.ndarray]:
        """Prefill each prefix, then feed each of its feeds one decode step at a time: logits
        [1 + len(feed), vocab] per sequence (after the prefix, then after each fed token)."""
        out = []
        for first in range(0, len(prefixes), self.batch):
            chunk = range(first, min(len(prefixes), first + self.batch))
            seqs = self._start(len(chunk))
            rows = [[row] for row in self._call(seqs, [list(prefixes[j]) for j in chunk])]
            for step in range(max(len(feeds[j]) for j in chunk)):
                live = [n for n, j in enumerate(chunk) if step < len(feeds[j])]
                logits = self._call([seqs[n] for n in live], [[int(feeds[chunk[n]][step])] for n in live])
                for n, row in zip(live, logits):
                    rows[n].append(row)
            out.extend(np.stack(r) for r in rows)
        return out

    # ---- verify.compare's calls ---------------------------------------------------------------
    def teacher_forced(self, prompts, continuations) -> list[np.ndarray]:
        out = []
        for prompt, cont, logits in zip(prompts, continuations,
                                        self._fed(prompts, [list(c[:-1]) for c in continuations])):
            logprobs = log_softmax(logits)
            self._forced[tuple(prompt)] = (list(cont), logprobs.argmax(-1))
            out.append(logprobs)
        return out

    def greedy(self, prompts, n_new) -> tuple[list[list[int]], None]:
        news = []
        for prompt in prompts:
            new, forced = [], self._forced.pop(tuple(prompt), None)
            if forced is not None:
                for ref, choice in zip(forced[0][:n_new], forced[1]):
                    new.append(int(choice))
                    if choice != ref:
                        break
            news.append(new)
        pending = [j for j, new in enumerate(news) if len(new) < n_new]
        for first in range(0, len(pending), self.batch):
            chunk = pending[first:first + self.batch]
            seqs = self._start(len(chunk))
            logits = self._call(seqs, [list(prompts[j]) + news[j] for j in chunk])
            while True:
                live = []
                for n, j in enumerate(chunk):
                    if len(news[j]) < n_new:
                        news[j].append(int(np.argmax(logits[n])))
                        if len(news[j]) < n_new:
                            live.append(n)
                if not live:
                    break
                rows = self._call([seqs[n] for n in live], [[news[chunk[n]][-1]] for n in live])
                logits = np.zeros((len(chunk), rows.shape[1]), np.float32)
                logits[live] = rows
        return news, None

    def sequence_logits(self, sequences) -> list[np.ndarray]:
        return self._fed([list(s[:1]) for s in sequences], [list(s[1:]) for s in sequences])


def program_scorer(artifact, options) -> ProgramScorer:
    """The export's candidate off macOS: the artifact's package, interpreted."""
    package = Path(artifact.path) / artifact.manifest["graph"]["file"]
    return ProgramScorer(package, int(artifact.manifest["max_context"]), threads=getattr(options, "threads", None))


@contextmanager
def blas_threads(threads: int):
    """numpy's OpenBLAS on ``threads`` threads meanwhile. The interpreter's products are small (a
    decode step's rows are the batch's sequences), and OpenBLAS's spinning threads make them
    slow on a busy host: a [2, 576] x [576, 1536] product took 30 ms on its default threads and
    1.4 ms on one on this 2-core machine. Where numpy's OpenBLAS is not found, nothing changes."""
    lib = _openblas()
    if lib is None:
        yield
        return
    get, set_ = lib
    previous = get()
    set_(int(threads))
    try:
        yield
    finally:
        set_(previous)


_BLAS = []


def _openblas():
    """(get, set) of the number of threads of the OpenBLAS numpy loaded, or None."""
    if not _BLAS:
        found = None
        root = os.path.dirname(os.path.dirname(np.__file__))
        for path in glob.glob(os.path.join(root, "numpy.libs", "*openblas*")) + \
                glob.glob(os.path.join(root, "scipy_openblas64*", "lib", "*openblas*.so*")):
            lib = ctypes.CDLL(path)
            for suffix in ("scipy_openblas_{}_num_threads64_", "openblas_{}_num_threads64_",
                           "scipy_openblas_{}_num_threads", "openblas_{}_num_threads"):
                if hasattr(lib, suffix.format("set")) and hasattr(lib, suffix.format("get")):
                    found = (getattr(lib, suffix.format("get")), getattr(lib, suffix.format("set")))
                    break
            if found:
                break
        _BLAS.append(found)
    return _BLAS[0]

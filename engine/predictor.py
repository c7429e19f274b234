"""Run a package's model on batches of raw pixel windows and return change probabilities.

On CUDA the model runs in bf16/fp16 autocast, channels_last, from pinned host memory with
non-blocking copies; a CUDA out-of-memory halves the batch and retries. Optional test-time
augmentation (the trainer's test and Open-CD's: scales x horizontal flip) averages the probabilities.
The process-wide tuning (cuDNN's autotuning, glibc's allocator) is the calling program's: ``engine.process``.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from geochange.engine.backends import model_forward, resolve_backend
from geochange.engine.errors import GeoChangeError, OptionError, PackageError
from geochange.engine.hardware import cpu_bf16
from geochange.engine.inputs import check_backscatter, normalise
from geochange.engine.manifest import is_number
from geochange.engine.package import ModelPackage

# Every registered backbone reduces by at most 32; inputs are padded to a multiple of it.
SIZE_MULTIPLE = 32
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Open-CD's test-time augmentation, which the M2CD paper tests with (and the trainer's default).
DEFAULT_TTA = {"scales": [0.75, 1.0, 1.25], "flip": True}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:i``, checked against the machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GeoChangeError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise GeoChangeError(f"device {name!r} asked for, but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise GeoChangeError(f"device {name!r} asked for, but only {torch.cuda.device_count()} GPU(s) exist")
    elif device.type != "cpu":
        raise GeoChangeError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    return device


def resolve_precision(precision: str, device: torch.device, log=lambda m: None) -> str:
    """The precision that runs on ``device`` for ``precision``. ``auto``: bf16 on a GPU, and on a CPU that
    computes in bf16 natively (``hardware.cpu_bf16``), else fp32; fp16 is for GPUs (a CPU runs fp32). On a CPU,
    ``log`` hears why."""
    if precision != "auto" and precision not in PRECISIONS:
        raise OptionError(f"precision must be auto or one of {', '.join(PRECISIONS)}, not {precision!r}")
    if device.type == "cuda":
        return "bf16" if precision == "auto" else precision
    if precision == "auto":
        native, why = cpu_bf16()
        precision = "bf16" if native else "fp32"
        log(f"precision {precision} on the CPU: {why}")
    elif precision == "fp16":
        log("precision fp32 on the CPU: fp16 is for GPUs")
        precision = "fp32"
    return precision


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % multiple, -w % multiple
    if not (pad_h or pad_w):
        return x
    # Reflection keeps image statistics at the border; it needs the pad to be smaller than the side.
    mode = "reflect" if pad_h < h and pad_w < w else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


def resized(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(..., bands, H, W)`` resized bilinearly to ``size``, in its own type: raw values are scaled by
    their type (uint8 / 255), so a float copy of a uint8 image would be read as reflectance or as SAR
    backscatter. Integer images are rounded, as an image library resizing them does."""
    x = torch.as_tensor(image, dtype=torch.float32)
    out = F.interpolate(x.reshape(-1, *x.shape[-3:]), size=size, mode="bilinear",
                        align_corners=False).reshape(*x.shape[:-2], *size).numpy()
    if np.issubdtype(image.dtype, np.integer):
        limits = np.iinfo(image.dtype)
        out = np.clip(np.rint(out), limits.min, limits.max)
    return out.astype(image.dtype)


def check_tta(tta: dict | None) -> dict | None:
    """``{"scales": [...], "flip": bool}`` checked (None: no test-time augmentation)."""
    if tta is None:
        return None
    scales, flip = (tta.get("scales"), tta.get("flip")) if isinstance(tta, dict) else (None, None)
    if (not isinstance(scales, (list, tuple)) or not scales or not all(is_number(s) and 0 < s <= 4 for s in scales)
            or not isinstance(flip, bool)):
        raise OptionError(f"test-time augmentation must be scales in (0, 4] and a flip of true or false, not {tta}")
    return {"scales": [float(s) for s in scales], "flip": flip}


def model_tta(manifest: dict) -> dict:
    """The test-time augmentation a package was tested with (the trainer records it), else the default."""
    recorded = manifest.get("training", {}).get("metrics", {}).get("test") or {}
    return check_tta(recorded.get("tta")) or dict(DEFAULT_TTA)


def to_probability(output: torch.Tensor, activation: str) -> torch.Tensor:
    """Model output ``(N, C, H, W)`` -> change probability ``(N, H, W)``."""
    if activation == "sigmoid":
        return torch.sigmoid(output[:, 0])
    return torch.softmax(output, dim=1)[:, 1]


class Predictor:
    """Normalises raw windows as the package's manifest says and returns probabilities.

    ``scales``/``sar_db`` per date (``{"pre": ..., "post": ...}``) override how raw values are read
    (see ``engine.inputs.normalise``); ``precision``: the autocast type (``resolve_precision``; the default,
    fp32, is the trainer's, whose figures a package records; the front ends' default is ``auto``); ``backend``:
    what runs the model on a CPU (``engine.backends``; the default, eager, is the trainer's, the front ends'
    is ``auto``); ``cuda_graphs`` on CUDA only (see ``_replay``). ``tta`` (``{"scales", "flip"}``, see
    ``check_tta``) averages the probability over the window resized by each scale, as is and flipped left-right.
    """

    def __init__(self, package: ModelPackage, device: str | torch.device = "auto", *, precision: str = "fp32",
                 tta: dict | None = None, scales: dict | None = None, sar_db: bool = False, cuda_graphs: bool = True,
                 backend: str = "eager", log=lambda m: None):
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.package, self.tta, self.log = package, check_tta(tta), log
        self.dtype = PRECISIONS[resolve_precision(precision, self.device, log)]
        chosen, why = resolve_backend(backend, self.device)
        if backend == "auto":
            log(f"backend {chosen}: {why}")
        self.scales = dict(scales or {})
        for date, scale in self.scales.items():
            if scale is not None and not (is_number(scale) and scale > 0):  # 0 would turn every pixel to nodata
                raise OptionError(f"the {date} scale (the raw value meaning 1.0) must be a number above 0, "
                                  f"not {scale}")
        self.sar_db = sar_db
        self.model = package.model.to(self.device).eval()
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.forward = model_forward(package, chosen, self.dtype, log)  # (pre, post) -> logits
        self.backend = "eager" if self.forward is package.model else chosen  # what runs
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self._graphs: dict = {}  # input shapes -> (static inputs, graph, static output)
        self.inputs = package.manifest["inputs"]
        self.max_batch: int | None = None  # lowered after a CUDA out-of-memory, kept for later batches

    def _to_device(self, raw: np.ndarray, date: str) -> torch.Tensor:
        if self.scales.get(date) is None:  # a given scale reads the date as it is
            check_backscatter(raw, self.inputs[date], self.sar_db, f"the {date} image")
        x = torch.from_numpy(np.ascontiguousarray(raw))
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        return normalise(x, self.inputs[date], scale=self.scales.get(date), sar_db=self.sar_db)

    def _probability(self, pre: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
        # No autocast weight cache: a CUDA graph must not capture casts of tensors made outside it.
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32,
                            cache_enabled=False):
            return to_probability(self.forward(pre, post).float(), self.package.activation)

    def _replay(self, pre: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
        """``_probability`` through a CUDA graph captured once per input shape.

        Small models launch hundreds of short kernels a batch, and each launch takes Python's GIL
        back from the reader and writer threads; one graph replay is one launch. Models
        that synchronise with the host (M2CD-ConvNeXt's expert routing sizes its groups on the CPU)
        cannot be captured and run eagerly.
        """
        key = (pre.shape, post.shape)
        if key not in self._graphs:
            captured = self._capture(pre, post)
            if captured is None:
                return self._probability(pre, post)
            self._graphs[key] = captured
        static_pre, static_post, graph, out = self._graphs[key]
        static_pre.copy_(pre)
        static_post.copy_(post)
        graph.replay()
        return out.clone()

    def _capture(self, pre: torch.Tensor, post: torch.Tensor):
        static_pre, static_post = pre.clone(), post.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
            for _ in range(2):
                self._probability(static_pre, static_post)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                out = self._probability(static_pre, static_post)
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as error:
            torch.cuda.synchronize(self.device)
            self.log(f"{self.package.manifest['architecture']} runs eagerly: it cannot be captured as a CUDA "
                     f"graph ({str(error).splitlines()[0]})")
            self._graphs.clear()  # no other shape would capture either: free their memory, run eagerly
            self.cuda_graphs = False
            return None
        return static_pre, static_post, graph, out

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        x = _pad_to_multiple(x, SIZE_MULTIPLE)
        return x.contiguous(memory_format=torch.channels_last) if self.device.type == "cuda" else x

    def _forward(self, pre: np.ndarray, post: np.ndarray) -> torch.Tensor:
        """Raw windows -> ``(N, H, W)`` probabilities; with TTA, the mean over scales x flips (a resized
        window is predicted at its own size and its probability resized back)."""
        run = self._replay if self.cuda_graphs else self._probability
        h, w = pre.shape[-2:]
        passes = [(1.0, False)] if self.tta is None else \
            [(s, f) for s in self.tta["scales"] for f in ((False, True) if self.tta["flip"] else (False,))]
        total, scaled = None, {}
        for scale, flipped in passes:
            size = (max(1, round(h * scale)), max(1, round(w * scale)))
            if size not in scaled:  # normalised once per scale, for both flips
                scaled = {size: [self._to_device(resized(x, size) if size != (h, w) else x, date)
                                 for x, date in ((pre, "pre"), (post, "post"))]}
            a, b = (x.flip(-1) if flipped else x for x in scaled[size])
            prob = run(self._padded(a), self._padded(b))[:, :size[0], :size[1]]
            prob = prob.flip(-1) if flipped else prob
            if size != (h, w):
                prob = F.interpolate(prob[:, None].float(), size=(h, w), mode="bilinear", align_corners=False)[:, 0]
            total = prob.float() if total is None else total + prob
        return total / len(passes)

    def __call__(self, pre: np.ndarray, post: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """``(N, bands, H, W)`` raw windows of each date -> ``(N, H, W)`` float32 probabilities.
        (``valid``, the pipeline's ``(N, H, W)`` mask, only restricts the check for NaN: invalid pixels
        come zeroed.)"""
        step = self.max_batch or len(pre)
        prob = np.concatenate([self._run(pre[i:i + step], post[i:i + step]) for i in range(0, len(pre), step)])
        # NaN would be written as nodata: a broken model would report "no change".
        if not np.isfinite(prob if valid is None else prob[valid]).all():
            raise self._not_finite()
        return prob

    def _not_finite(self) -> GeoChangeError:
        """The error for probabilities that are NaN or infinite at valid pixels, naming its cause."""
        broken = [name for name, t in self.model.state_dict().items()
                  if t.is_floating_point() and not torch.isfinite(t).all()]
        model = f"{self.package.path or self.package.manifest['architecture']}: the model gave NaN/inf for valid pixels"
        if broken:
            return PackageError(f"{model}: its weights hold NaN/inf ({len(broken)} tensor(s), e.g. {broken[0]})")
        return GeoChangeError(f"{model} although its weights are finite: the input values overflow it; check the "
                              "input scale" + (" or run in fp32" if self.dtype != torch.float32 else ""))

    @torch.inference_mode()
    def _run(self, pre: np.ndarray, post: np.ndarray) -> np.ndarray:
        try:
            prob = self._forward(pre, post)
        except torch.cuda.OutOfMemoryError:
            if len(pre) == 1:
                raise GeoChangeError("CUDA out of memory with a batch of one window: lower the tile size") from None
            self.max_batch = len(pre) // 2
            self.log(f"CUDA out of memory with a batch of {len(pre)} windows: batch lowered to {self.max_batch}")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return self(pre, post)
        return prob.cpu().numpy()

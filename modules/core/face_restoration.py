"""Face restoration (GFPGAN, CodeFormer): which files are installed, what is missing, and the step
Extras and "Restore faces" call. The model work is in engine/face_restore.py (torch, OpenCV).

Files (never downloaded, never shipped; the user copies them):
  models/GFPGAN/GFPGANv1.4.pth (or any GFPGAN*.pth / .safetensors)       the GFPGAN restorer
  models/Codeformer/codeformer-v0.1.0.pth (or codeformer*.pth)           the CodeFormer restorer
  models/GFPGAN/face_detection_yunet_2023mar.onnx (or any *yunet*.onnx)  the face detector (OpenCV YuNet)
CodeFormer's weights carry the S-Lab non-commercial licence; GFPGAN's are Apache-2.0 (docs/architecture.md).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modules.core.pipeline import ProcessingError

MODEL_EXTENSIONS = (".pth", ".pt", ".safetensors", ".ckpt")
DETECTOR_HINT = "face_detection_yunet_2023mar.onnx"


def _first(folder: Path, prefix: str, extensions: tuple[str, ...]) -> Path | None:
    if not folder.is_dir():
        return None
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in extensions and prefix in p.name.lower())
    return files[-1] if files else None   # the highest version ("GFPGANv1.4" after "GFPGANv1.3")


@dataclass(frozen=True)
class FaceFiles:
    gfpgan: Path | None
    codeformer: Path | None
    detector: Path | None


class FaceRestoration:
    def __init__(self, gfpgan_dir: Path, codeformer_dir: Path):
        self.gfpgan_dir, self.codeformer_dir = gfpgan_dir, codeformer_dir
        self._engine: Any = None
        self._lock = threading.Lock()

    @classmethod
    def from_opts(cls, models_dir: Path, opts: Any = None) -> "FaceRestoration":
        def folder(flag: str, default: str) -> Path:
            value = getattr(opts, flag, None) if opts is not None else None
            return Path(value).expanduser().resolve() if value else models_dir / default
        return cls(folder("gfpgan_models_path", "GFPGAN"), folder("codeformer_models_path", "Codeformer"))

    def files(self) -> FaceFiles:
        detector = _first(self.gfpgan_dir, "yunet", (".onnx",)) or _first(self.codeformer_dir, "yunet", (".onnx",))
        return FaceFiles(gfpgan=_first(self.gfpgan_dir, "gfpgan", MODEL_EXTENSIONS),
                         codeformer=_first(self.codeformer_dir, "codeformer", MODEL_EXTENSIONS),
                         detector=detector)

    def restorers(self) -> list[dict[str, str]]:
        """A1111's /face-restorers: the installed restorers (usable once the detector is there too)."""
        files = self.files()
        out = []
        if files.codeformer is not None:
            out.append({"name": "CodeFormer", "cmd_dir": str(self.codeformer_dir)})
        if files.gfpgan is not None:
            out.append({"name": "GFPGAN", "cmd_dir": str(self.gfpgan_dir)})
        return out

    def missing(self, which: str = "") -> list[str]:
        """Sentences saying which file goes where, for what is not installed ("" = anything)."""
        files, out = self.files(), []
        if which in ("", "GFPGAN") and files.gfpgan is None:
            out.append(f"GFPGAN: put GFPGANv1.4.pth in {self.gfpgan_dir}")
        if which in ("", "CodeFormer") and files.codeformer is None:
            out.append(f"CodeFormer: put codeformer-v0.1.0.pth in {self.codeformer_dir} (non-commercial licence)")
        if files.detector is None:
            out.append(f"Face detector: put {DETECTOR_HINT} (OpenCV Zoo's YuNet) in {self.gfpgan_dir}")
        return out

    def _engine_for(self, files: FaceFiles) -> Any:
        from modules.engine.face_restore import FaceRestorer

        with self._lock:
            if self._engine is None or self._engine.files != files:
                self._engine = FaceRestorer(files)
            return self._engine

    def restore(self, image: Any, params: Any) -> tuple[Any, dict[str, Any]]:
        """Extras' step: GFPGAN then CodeFormer, each blended in at its visibility."""
        info: dict[str, Any] = {}
        for name, visibility in (("GFPGAN", params.gfpgan_visibility), ("CodeFormer", params.codeformer_visibility)):
            if visibility <= 0:
                continue
            image = self.apply(image, name, visibility, params.codeformer_weight)
            info[f"{name} visibility"] = visibility
            if name == "CodeFormer":
                info["CodeFormer weight"] = params.codeformer_weight
        return image, info

    def apply(self, image: Any, name: str, visibility: float = 1.0, codeformer_weight: float = 0.5) -> Any:
        """`image` with its faces restored by `name`, blended at `visibility`; ProcessingError when files lack."""
        files = self.files()
        missing = self.missing(name)
        if missing:
            raise ProcessingError(f"{name} face restoration needs files that are not installed: " + "; ".join(missing))
        return self._engine_for(files).restore(image, name, visibility, codeformer_weight)

    def for_generation(self, image: Any, options: Any) -> Any:
        """txt2img/img2img "Restore faces": the `face_restoration_model` setting's restorer at full strength."""
        name = "GFPGAN" if str(options.get("face_restoration_model", "CodeFormer")) == "GFPGAN" else "CodeFormer"
        return self.apply(image, name, 1.0, float(options.get("code_former_weight", 0.5)))

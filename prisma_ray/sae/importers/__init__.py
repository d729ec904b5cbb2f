"""Import published SAEs and transcoders (ViT-Prisma, SAELens, EleutherAI sparsify) into our
checkpoint format, mapping their hook and model names onto ours. Pickled files are read with a
restricted unpickler (tensors and plain containers only): nothing from a downloaded file runs."""

from .common import CheckpointImportError, Imported, UnsafePickleError
from .convert import ImportConfig, ImportResult, convert, detect_format, import_dictionary, import_files

__all__ = [
    "CheckpointImportError",
    "ImportConfig",
    "ImportResult",
    "Imported",
    "UnsafePickleError",
    "convert",
    "detect_format",
    "import_dictionary",
    "import_files",
]

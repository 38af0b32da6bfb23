"""patchalign: language-grounded 3D shape understanding (PatchAlign3D, ZeroKey) on PyTorch Lightning.

Downstream use needs no Lightning::

    import patchalign
    model = patchalign.load_pretrained("exported/")   # written by `python -m patchalign export`
    seg = model.segment(points, ["wing", "fuselage", "tail"])

Importing this package pulls in torch, timm and safetensors only (a test keeps it that way).
"""

from patchalign.model import EncoderConfig, EncoderOutput, PatchAlignEncoder
from patchalign.pretrained import PretrainedPatchAlign, load_pretrained

__all__ = ["EncoderConfig", "EncoderOutput", "PatchAlignEncoder", "PretrainedPatchAlign", "load_pretrained"]
__version__ = "0.1.0"

"""What the fixture makers in this folder share (they are run by hand, never by CI or pytest).

Each make_<script>.py imports the OFFICIAL implementation from a checkout given on its command
line, builds a small seeded configuration, moves every parameter away from its initial value,
runs a seeded input, and saves {config, state_dict, inputs, outputs, grads} to <script>.pt here.
tests/test_parity.py loads each file strictly into our model and compares.

timm (which the official ToMe / MAE code builds on) imports torchvision at import time, and
torchvision has no CPU build on some machines; `stand_in_torchvision()` registers a minimal
stand-in module tree (only the names timm touches while importing) when the real one is absent.
None of those names is used by the models compared here. `import_slowfast` does the same for
SlowFast (make_revvit.py, make_mvit_video.py), `import_detectron2` for detectron2's ViTDet
backbone (make_vitdet.py).
"""
import argparse
import enum
import importlib.util
import os
import sys
import types

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(doc, *paths):
    """--<name> PATH for each official checkout the maker needs, plus --out (default: here)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    for name in paths:
        parser.add_argument(f"--{name}", required=True, help=f"path to a checkout of {name}")
    parser.add_argument("--out", default=HERE, help="folder for the fixture file")
    args = parser.parse_args()
    for name in paths:
        sys.path.insert(0, os.path.abspath(getattr(args, name)))
    return args


def stand_in_torchvision():
    """Register placeholder `torchvision` modules unless the real package is installed."""
    if importlib.util.find_spec("torchvision") is not None:
        return

    def module(name, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)

        def missing(attr):  # any other name: a class that fails only if it is used
            if attr.startswith("__"):
                raise AttributeError(attr)

            def fail(*args, **kwargs):
                raise NotImplementedError(f"stand-in torchvision has no {name}.{attr}")
            return type(attr, (), {"__init__": fail, "__call__": fail})
        m.__getattr__ = missing
        sys.modules[name] = m
        return m

    interp = enum.Enum("InterpolationMode", {k: k.lower() for k in
                                             ["NEAREST", "BILINEAR", "BICUBIC", "BOX", "HAMMING",
                                              "LANCZOS"]})
    functional = module("torchvision.transforms.functional", InterpolationMode=interp)
    transforms = module("torchvision.transforms", functional=functional, InterpolationMode=interp)
    misc = module("torchvision.ops.misc")
    ops = module("torchvision.ops", misc=misc)
    datasets = module("torchvision.datasets")
    module("torchvision", transforms=transforms, ops=ops, datasets=datasets, __version__="0.0")


def perturb(model, seed, scale=0.05):
    """Add seeded Gaussian noise (std `scale`) to every parameter, so that no table stays zero,
    no LayerNorm stays (1, 0) and no bias stays 0: parity on trivial weights proves little.
    Parameters are visited in name order, so the noise does not depend on module order."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda item: item[0]):
            p.add_(scale * torch.randn(p.shape, generator=g))


def grads_of(model, inputs, outputs, seed):
    """Backpropagate a seeded random projection of the outputs; return {name: grad} for every
    parameter plus 'input' for each input that requires grad (given as a dict name -> tensor)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(outputs.shape, generator=g)
    model.zero_grad()
    (outputs * weight).sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()
             if p.grad is not None}
    for name, x in inputs.items():
        if x.grad is not None:
            grads[f"input.{name}"] = x.grad.detach().clone()
    return grads, weight


def save(fixture, name, out):
    """Write float32 tensors (detached, contiguous) and report the file size."""
    def clean(v):
        if isinstance(v, torch.Tensor):
            v = v.detach().contiguous()
            return v.float() if v.is_floating_point() else v
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(clean(x) for x in v)
        return v
    path = os.path.join(out, f"{name}.pt")
    torch.save(clean(fixture), path)
    print(f"wrote {path}: {os.path.getsize(path) / 1e6:.3f} MB")


def stub(name, **attrs):
    """Register a module `name` holding `attrs` (in place of a package not installed)."""
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    sys.modules[name] = m
    return m


def unused(name):
    """A class that is imported by the official code but never built for the models compared."""
    def fail(self, *args, **kwargs):
        raise NotImplementedError(f"stand-in {name}")
    return type(name, (), {"__init__": fail})


def import_slowfast(root, package="slowfast"):
    """SlowFast's MViT builder without its model zoo (also MeMViT's fork of it: package="memvit").
    <package>/models/__init__.py imports every family (and detectron2, pytorchvideo); here only
    the builder's own imports run, with stand-ins for names imported but not used by MViT /
    Rev-ViT / MeMViT: detectron2.layers.ROIAlign (detection head), pytorchvideo's batch-norm and
    Swish (ResNet paths), <package>.utils.logging (simplejson).
    Returns (<package>.models.video_model_builder, <package>.config.defaults.get_cfg)."""
    stub("detectron2")
    stub("detectron2.layers", ROIAlign=unused("ROIAlign"))
    stub("pytorchvideo")
    stub("pytorchvideo.layers")
    stub("pytorchvideo.layers.batch_norm", NaiveSyncBatchNorm1d=unused("NaiveSyncBatchNorm1d"),
         NaiveSyncBatchNorm3d=unused("NaiveSyncBatchNorm3d"))
    stub("pytorchvideo.layers.swish", Swish=unused("Swish"))
    import importlib
    import logging
    sys.modules[f"{package}.utils.logging"] = types.SimpleNamespace(get_logger=logging.getLogger)
    importlib.import_module(f"{package}.utils")  # from the checkout on sys.path
    models = stub(f"{package}.models")  # the package, without running its __init__
    models.__path__ = [os.path.join(root, package, "models")]
    defaults = importlib.import_module(f"{package}.config.defaults")
    builder = importlib.import_module(f"{package}.models.video_model_builder")
    return builder, defaults.get_cfg


def import_detectron2(root):
    """detectron2's ViT and SimpleFeaturePyramid without building detectron2 (no compiled _C).
    detectron2.modeling/__init__.py and detectron2/modeling/backbone/__init__.py import every
    model and the config system (omegaconf, hydra); here they are registered as empty packages
    pointing at the checkout, so that only the modules ViTDet's backbone needs run, unchanged:
    modeling/backbone/{backbone,build,fpn,resnet,utils,vit}.py and detectron2.layers (whose
    torchvision imports, nms / roi_align / deform_conv2d, meet stand_in_torchvision: none of them
    is used by ViT or SimpleFeaturePyramid). fvcore and timm (timm.models.layers DropPath, Mlp:
    used, the real ones) are required.
    Returns (detectron2.modeling.backbone.vit, detectron2.modeling.backbone.fpn)."""
    import importlib
    stand_in_torchvision()
    for package in ["detectron2.modeling", "detectron2.modeling.backbone"]:
        stub(package).__path__ = [os.path.join(root, *package.split("."))]
    vit = importlib.import_module("detectron2.modeling.backbone.vit")
    fpn = importlib.import_module("detectron2.modeling.backbone.fpn")
    return vit, fpn

"""KFP v2 components, one per pipeline step (one module each).

Each component is a thin wrapper that calls one `tl_core` entry point, the same function the
`tl` command of that step calls, inside the project's image (k8s/Dockerfile). Data never flows
through the pipeline: a step writes its outputs under TL_WORKDIR (local or s3://) and hands the
next step a small artifact that says where they are (see `artifacts`).
"""

import os

# One image for every step; its name:tag is a setting, read when the pipeline is compiled.
IMAGE = os.environ.get("TL_IMAGE", "tl-core:0.1.0")


def tl_component(func):
    """`@dsl.component` in the project's image. The image already holds tl_core, its pinned
    dependencies and kfp: nothing is pip-installed when a step starts (by default KFP would
    install kfp itself at every step)."""
    # Imported here: a running step imports this package too (for `artifacts`), and there
    # kfp.dsl is the runtime subset, without `component`.
    from kfp import dsl

    return dsl.component(func, base_image=IMAGE, install_kfp_package=False)

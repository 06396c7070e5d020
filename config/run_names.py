"""What a run name may be: one folder name, so that ``<log.output_dir>/<log.run_name>`` stays inside the output
folder. Plain Python with no imports of the project: the config checks (``config.validation``) and the resolution
of ``--trainer.resume=auto`` (``config.resume``, before validation runs) both ask it."""
from __future__ import annotations

import os
from typing import Optional

RUN_NAME_RULE = "a single folder name without '/' that is not '.' or '..' (e.g. vits16-run1)"


def run_name_problem(name: str, output_dir: str) -> Optional[str]:
    """None when ``name`` names a folder directly inside ``output_dir`` (or is empty: the run is then named
    automatically); otherwise the one-line error. Absolute paths, any separator ('../x', 'a/b', '/tmp/x') and the
    names '.' and '..' would put the run somewhere else than in a folder of its own inside ``output_dir``."""
    if not name:
        return None
    separators = {"/", os.sep, os.altsep or "/"}
    if name in (".", "..") or any(sep in name for sep in separators) or "\0" in name or os.path.isabs(name):
        return (f"--log.run_name={name!r} would not be a folder of its own inside --log.output_dir ({output_dir}): "
                f"give {RUN_NAME_RULE}, and choose the parent folder with --log.output_dir")
    return None

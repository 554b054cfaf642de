"""``python -m gen_ai_frames.testing.fake_server``; also runs as a plain script by path.

Run by path (``python path/to/fake_server/__main__.py``), this file loads its own
package under a private name, so neither ``gen_ai_frames`` nor pandas is imported.
"""

from __future__ import annotations

import sys

if __package__:
    from .cli import main
else:  # run by path: there is no parent package to import relatively from
    import importlib.util
    import os

    _dir = os.path.dirname(os.path.abspath(__file__))
    _name = "_gen_ai_frames_fake_server"
    _spec = importlib.util.spec_from_file_location(
        _name, os.path.join(_dir, "__init__.py"), submodule_search_locations=[_dir]
    )
    assert _spec is not None and _spec.loader is not None
    _package = importlib.util.module_from_spec(_spec)
    sys.modules[_name] = _package  # the submodules' relative imports look their package up here
    _spec.loader.exec_module(_package)
    main = _package.main

if __name__ == "__main__":
    sys.exit(main())

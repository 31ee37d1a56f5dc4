# Imported as mmoe.contract only: the packaging maps this folder to that name (pyproject.toml's
# package-dir). Imported by its folder name (from a checkout's root, say) it would be a second
# copy of every module beside the first, with classes and registries of its own: refuse that.
if __name__ != "mmoe.contract":
    raise ImportError(f"import mmoe.contract, not {__name__} (the folder is installed under mmoe)")

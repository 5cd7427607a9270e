"""The shipped dataset files (a package only so that setuptools can carry them).

setup.cfg maps this package to the top-level ``data/`` folder (``package_dir``), so a built wheel installs the CSVs
and PROVENANCE.md of ``data/`` here, as ``nlmefit/datasets/files/``. In a source checkout or an editable install
this folder holds only this file and :mod:`nlmefit.datasets` reads ``data/`` directly. ``data/`` is canonical:
do not put data files here. This file exists so that ``packages = find:`` lists ``nlmefit.datasets.files``.
"""

"""Stand-in for the `distutils` that Python 3.12 removed (see ../README.md): MONAI Label 0.8.5 imports
`distutils.util.strtobool` (monailabel/utils/others/generic.py, class_utils.py). Installed only where
`import distutils.util` fails, i.e. on Python >= 3.12 without setuptools' distutils hook."""

#!/usr/bin/env bash
# Creates .venv-tiatoolbox/ at the repository root: TIAToolbox 2.x beside this project, kept apart from the core
# venv because TIAToolbox declares torch<2.13 and needs torchvision. TIAToolbox is installed with --no-deps
# (its declared torch cap would otherwise resolve to an old 1.x release that fails to import) and its runtime
# imports for the engines and the annotation store are installed explicitly. Quick no-op when already present.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TIATOOLBOX_VENV:-$ROOT/.venv-tiatoolbox}"
TIATOOLBOX_VERSION="2.1.3"
TORCH="torch==2.14.1"
TORCHVISION="torchvision==0.29.1"
PY="$VENV/bin/python"
STAMP="$VENV/.wsi-grunet-setup-$TIATOOLBOX_VERSION"

if [[ -f "$STAMP" ]] && "$PY" -c "import tiatoolbox, wsi_grunet" 2>/dev/null; then
    echo "TIAToolbox env ready: $VENV"
    exit 0
fi

[[ -x "$PY" ]] || python3 -m venv "$VENV"
PIP=("$PY" -m pip install --quiet)
"${PIP[@]}" "$TORCH" "$TORCHVISION"
"${PIP[@]}" --no-deps "tiatoolbox==$TIATOOLBOX_VERSION"
# What `import tiatoolbox.models` and `tiatoolbox.annotation` import, within TIAToolbox's declared ranges
# (tools/graph.py imports umap, wsireader SimpleITK, the SAM architecture transformers). Not installed: its
# declared opencv-python (the headless build has the same cv2 without GUI libraries), s3fs, sphinx, jupyterlab,
# bokeh/flask (visualisation server), aiohttp, ipywidgets.
"${PIP[@]}" "$TORCH" "$TORCHVISION" \
    "numpy>=2.0,<2.4.4" "zarr>=3.0.8,<3.2" "dask[array]>=2026.1.2,<2026.7.1" "shapely>=2.0,<=2.1.2" \
    "scipy>=1.8,<1.17.1" "scikit-image>=0.26,<0.26.1" "opencv-python-headless>=4.6,<5" "pandas>=2,<3.0.3" \
    "matplotlib>=3.10,<3.11.1" "pillow>=9.3,<12.2" "tifffile>=2025.5.21,<2026.3.3" "imagecodecs<2026.3.6" \
    "openslide-python>=1.4,<1.4.6" "openslide-bin>=4.0.0.2,<4.0.1.2" "pyyaml>=6,<6.0.3" "requests<2.34.2" \
    "tqdm>=4.64.1,<4.69" "joblib>=1.1.1,<1.5.3" "filelock>=3.9,<3.29" "psutil" "defusedxml==0.7.1" \
    "timm>=1.0.3,<1.0.28" "huggingface_hub>=0.33.3,<1.24" "glymur>=0.12.7,<0.14.8" "wsidicom>=0.18,<0.34" \
    "pydicom>=3.0,<3.0.2" "click>=8.2,<8.4.2" "scikit-learn>=1.2,<1.9" "typing_extensions" \
    "umap-learn>=0.5.3,<0.5.12" "numba>=0.57,<0.66" "SimpleITK>=2.2.1,<2.5.5" "transformers>=4.51.1,<5.14.1"
# This project without its torch requirement resolved again, then its own dependencies.
"${PIP[@]}" --no-deps -e "$ROOT"
"${PIP[@]}" "$TORCH" "$TORCHVISION" "numpy>=2.0,<2.4.4" "zarr>=3.0.8,<3.2" "tifffile>=2025.5.21,<2026.3.3" \
    "dask[distributed]>=2026.1.2,<2026.7.1" pyarrow "safetensors>=0.4" psutil
"$PY" -c "import tiatoolbox.models, tiatoolbox.annotation, wsi_grunet.interop; print('tiatoolbox', tiatoolbox.__version__)"
touch "$STAMP"
echo "TIAToolbox env ready: $VENV"

#!/usr/bin/env bash
# Rebuild RG1_UNCR_chest_PA.dcm (and LICENSE.pydicom-data.txt) beside this script from the PyPI wheel
# pydicom-data==1.0.0 (MIT): NEMA DICOM WG04 sample RG1, an adult PA chest CR, byte for byte.
# Needs pip (PYTHON, default python3, with its pip module), unzip and sha256sum. Nothing is written
# unless the checksum matches; each file is copied to a temporary name beside its target, then moved.
set -euo pipefail

WHEEL_SPEC="pydicom-data==1.0.0"
WHEEL="pydicom_data-1.0.0-py3-none-any.whl"
MEMBER="data_store/data/RG1_UNCR.dcm"
LICENSE_MEMBER="pydicom_data-1.0.0.dist-info/LICENSE"
SHA256="946f28f48b9fbf360196a9b835c8fce83b0c654bf85a5107663c8a61df02e498"
TARGET="RG1_UNCR_chest_PA.dcm"
LICENSE_TARGET="LICENSE.pydicom-data.txt"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work" "$here/.$TARGET.tmp.$$" "$here/.$LICENSE_TARGET.tmp.$$"' EXIT

"${PYTHON:-python3}" -m pip download --no-deps --only-binary=:all: -d "$work" "$WHEEL_SPEC"
unzip -q -o -j "$work/$WHEEL" "$MEMBER" "$LICENSE_MEMBER" -d "$work"
(cd "$work" && echo "$SHA256  RG1_UNCR.dcm" | sha256sum -c -)

install_file() {  # source target: copy to a temporary name in the target's folder, then rename over it
    cp "$1" "$here/.$2.tmp.$$"
    mv -f "$here/.$2.tmp.$$" "$here/$2"
}
install_file "$work/RG1_UNCR.dcm" "$TARGET"
install_file "$work/LICENSE" "$LICENSE_TARGET"
echo "wrote $here/$TARGET and $here/$LICENSE_TARGET"

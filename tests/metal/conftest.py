import pytest

import metal_emulator as emu


@pytest.fixture(scope="session")
def cxx():
    compiler = emu.find_compiler()
    if compiler is None:
        pytest.skip("no C++ compiler (g++, c++ or clang++) to build the Metal kernel emulator")
    return compiler


@pytest.fixture(scope="session")
def metal_emulator(cxx, request, tmp_path_factory):
    """The Metal kernels running on the SIMT emulator, built once per source hash."""
    cache = getattr(request.config, "cache", None)
    where = cache.mkdir("spqt-metal-emulator") if cache else tmp_path_factory.mktemp("spqt-metal-emulator")
    return emu.Emulator(emu.build(cxx, where))

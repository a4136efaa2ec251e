// Registration functions of the ops that live in dreampose_rt._C (one per op file).
#pragma once

#include <pybind11/pybind11.h>

void register_scheduler(pybind11::module_& m);

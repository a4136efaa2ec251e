// Column names of the coefficient table, in order. The layout is defined (and documented) in
// dreampose_rt/scheduler/table.py; the extension refuses to load if the two lists differ.
#pragma once

namespace dreampose_rt {
namespace scheduler {

constexpr const char* kTableColumns[] = {
    "timestep", "qx", "qm", "ox", "om", "oq", "os", "oh0", "oh1", "oh2",
    "oa", "akeep", "am", "write_slot", "save_sample",
};
constexpr int kNumTableColumns = sizeof(kTableColumns) / sizeof(kTableColumns[0]);

}  // namespace scheduler
}  // namespace dreampose_rt

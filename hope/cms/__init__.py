"""The Continuum Memory System engine (docs/design.md §5): fast CMS levels and their write schedule.

- `level`: one fast level: its state, its chunk loss and its write (`write_levels`), and the values of its
  fast weights (`fast_weight_values`);
- `schedule`: `CMSSchedule`, the segment loop, lazy and shared writes, and replays for one-token generation;
- `profile`: `write_timer`, a public profiler region around every write.

The model calls `CMSSchedule.run` with a function that runs the network on one piece; nothing here imports
the model.
"""

from hope.cms.level import fast_weight_values
from hope.cms.profile import WriteTimer, write_timer
from hope.cms.schedule import CMSSchedule

__all__ = ["CMSSchedule", "WriteTimer", "fast_weight_values", "write_timer"]

"""Imported by the fork server of harness.run.zygote before it forks any worker: every import a
cell needs, done once for all of them."""

from harness.run.worker import import_cell_modules

import_cell_modules()

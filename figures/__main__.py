"""``python -m figures``: placeholder until the reproductions land (issue 6)."""
import sys

PLANNED = ["agd_switching", "wsam_sharpness", "ndadam_direction", "adasam_convergence",
           "sala_overhead", "landscape_gallery"]

if __name__ == "__main__":
    print("sharpscape figures will reproduce:", ", ".join(PLANNED))
    sys.exit(0)

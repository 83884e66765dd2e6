"""Side-by-side benchmark of ConTNetPaDiM and anomalib's Padim / Patchcore / MHPatchcore on the same data."""

"""The two sensors' bands and units, in one place: every module that names a band or scales a DN imports them here.

Sentinel-2 L2A is stored as uint16 digital numbers, ``DN = reflectance × DN_SCALE`` (BigEarthNet v2 carries no +1000
BOA offset); Sentinel-1 GRD as backscatter σ⁰ in dB. Band orders are TerraMind's (``S2L2A``, ``S1GRD``), which are
also BigEarthNet v2's for S2; torchgeo returns S1 the other way round.
"""

#: Sentinel-2 L2A bands in BigEarthNet v2 / torchgeo / TerraMind ``S2L2A`` order (B10 is not in L2A).
S2_BANDS: tuple[str, ...] = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
#: Sentinel-1 GRD polarisations in TerraMind ``S1GRD`` order (torchgeo returns them the other way round).
S1_BANDS: tuple[str, ...] = ("VV", "VH")
#: Sentinel-2 L2A DN per unit of reflectance.
DN_SCALE = 10000.0

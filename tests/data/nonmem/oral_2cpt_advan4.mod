$PROBLEM Oral_2CPT single-dose subset (nlmixr2 benchmark data), ADVAN4 TRANS4, BLOCK(2) OMEGA
; data: nlmefit's data/Oral_2CPT.csv (see data/PROVENANCE.md); the SD == 1 subjects, the true-parameter and
; log-DV columns dropped. SS/II are dropped too: the single-dose records carry SS = 99, which NONMEM rejects.
$INPUT ID TIME DV LNDV=DROP MDV AMT EVID DOSE V1T=DROP CLT=DROP QT=DROP V2T=DROP KAT=DROP SS=DROP II=DROP SD CMT
$DATA ../../../data/Oral_2CPT.csv IGNORE=@ IGNORE=(SD.EQ.0)
$SUBROUTINE ADVAN4 TRANS4
$PK
CL = THETA(1)*EXP(ETA(1))
V2 = THETA(2)*EXP(ETA(2))
Q  = THETA(3)
V3 = THETA(4)
KA = THETA(5)*EXP(ETA(3))
S2 = V2
$ERROR
IPRED = F
Y = IPRED + IPRED*EPS(1)
$THETA (0, 4) ; CL
$THETA (0, 70) ; V2
$THETA (0, 4) ; Q
$THETA (0, 50) ; V3
$THETA (0, 1) ; KA
$OMEGA BLOCK(2) 0.1 0.01 0.1
$OMEGA 0.1
$SIGMA 0.04
$ESTIMATION METHOD=1 INTERACTION MAXEVAL=9999
$COVARIANCE

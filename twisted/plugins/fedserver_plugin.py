from twisted.application.service import ServiceMaker

fedserver = ServiceMaker(
    "fedserver",
    "fedserver.tap",
    "A plugin-based federation server (Wire, Matrix, MIMI, relay meshes).",
    "fedserver",
)

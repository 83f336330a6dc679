pytest_plugins = [
    "tests.support.pg",
    "tests.support.stores",
    "tests.support.vcsim",
    "tests.support.zfs",
    "tests.support.openzfs",
    "tests.support.platforms",
    "tests.support.browser",
]

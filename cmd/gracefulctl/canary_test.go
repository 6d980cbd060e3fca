package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/graceful-go/graceful"
	"github.com/graceful-go/graceful/control"
	"github.com/graceful-go/graceful/internal/loadtest"
)

// TestCanary deploys bad builds of the reference server under load, with a
// probation: each serves its share, is judged on what it served and rolled
// back, and the clients see nothing but the bad build's own 500s; the
// previous binary is back on disk. A good build is promoted after serving
// its share; a slow one is promoted only where latency is not judged.
func TestCanary(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	dir := t.TempDir()
	ctl, err := loadtest.Build(ctx, dir, "github.com/graceful-go/graceful/cmd/gracefulctl", false)
	require.NoError(t, err)
	build := func(version, ldflags string) string {
		bin, err := loadtest.BuildWith(ctx, filepath.Join(dir, version), "github.com/graceful-go/graceful/examples/httpserver", false, "-X main.version="+version+" "+ldflags)
		require.NoError(t, err)
		return bin
	}
	v1 := build("v1", "")
	failing := build("failing", "-X main.failRate=0.3")
	panicking := build("panicking", "-X main.panicAfter=1s")
	slow := build("slow", "-X main.extraLatency=20ms")
	v2 := build("v2", "")
	content := func(path string) []byte {
		b, err := os.ReadFile(path)
		require.NoError(t, err)
		return b
	}

	const share, window = 0.25, 2 * time.Second
	// start runs v1 from a path of its own, which deploys replace.
	start := func(t *testing.T, args ...string) (srv *loadtest.Server, deploy func(bin string) (string, int), live, sock string) {
		sdir := t.TempDir()
		live = filepath.Join(sdir, "bin", "httpserver")
		require.NoError(t, os.MkdirAll(filepath.Dir(live), 0o755))
		require.NoError(t, os.WriteFile(live, content(v1), 0o755))
		sock = filepath.Join(sdir, "control.sock")
		logs, err := os.Create(filepath.Join(sdir, "server.log"))
		require.NoError(t, err)
		args = append([]string{"-control", sock, "-upgrade-timeout", "30s", "-probation", window.String(), "-canary-share", fmt.Sprint(share)}, args...)
		srv, err = loadtest.Start(ctx, loadtest.Config{Bin: live, Dir: sdir, Logs: logs, Args: args})
		require.NoError(t, err)
		t.Cleanup(func() {
			srv.Kill()
			logs.Close()
			if t.Failed() {
				b, _ := os.ReadFile(logs.Name())
				t.Logf("server logs:\n%s", b)
			}
		})
		deploy = func(bin string) (string, int) {
			out, err := exec.CommandContext(ctx, ctl, "-socket", sock, "deploy", bin).CombinedOutput()
			var ee *exec.ExitError
			if errors.As(err, &ee) {
				return string(out), ee.ExitCode()
			}
			require.NoError(t, err)
			return string(out), 0
		}
		return srv, deploy, live, sock
	}
	mix := loadtest.Mix{KeepAliveGET: 16, FreshGET: 4}
	// during runs deploy under load and returns what the clients saw, and
	// how many requests ended while it ran.
	during := func(srv *loadtest.Server, deploy func(string) (string, int), bin string) (out string, code int, st *loadtest.Stats, inWindow int) {
		load := loadtest.StartLoad(srv.Addr, mix)
		waitRequests(t, load, 100) // the clients' connections are open: the split covers them too
		began := time.Now()
		out, code = deploy(bin)
		ended := time.Now()
		st = load.Stop()
		for _, o := range st.Timeline {
			if !o.At.Before(began) && !o.At.After(ended) {
				inWindow++
			}
		}
		return out, code, st, inWindow
	}

	t.Run("latency judged", func(t *testing.T) {
		srv, deploy, live, sock := start(t, "-probation-latency-ratio", "3")
		old := srv.PID()

		t.Run("failing build rolled back", func(t *testing.T) {
			out, code, st, n := during(srv, deploy, failing)
			assert.Equal(t, 1, code, out)
			assert.Regexp(t, `rolled back after 2s: 5xx (2\d|3\d)\.\d% of [\d,]+ requests vs 0\.0% of [\d,]+`, out)
			assert.Contains(t, out, "the previous binary is back at "+live)
			assert.Equal(t, content(v1), content(live), "byte for byte")
			assert.Equal(t, old, srv.PID(), "the old process serves on")
			assert.Equal(t, old, loadtest.ReadPIDFile(srv.PIDFile), "PID file unchanged")
			t.Logf("%s500s seen: %d of %d requests during the deploy", out, st.Failures["status"], n)
			fails := st.Failures["status"]
			assert.Equal(t, fails, st.Failed(), "the only errors are the canary's 500s: %v %v", st.Failures, st.Samples)
			assert.Positive(t, fails, "the canary served its share")
			assert.LessOrEqual(t, float64(fails), 2*share*0.3*float64(n), "bounded by share × rate × requests (%d in the window)", n)

			st2, err := control.Details(ctx, sock)
			require.NoError(t, err)
			require.NotEmpty(t, st2.Upgrades)
			last := st2.Upgrades[len(st2.Upgrades)-1]
			assert.Equal(t, graceful.OutcomeRolledBack, last.Outcome)
			assert.Contains(t, last.Err, "rolled back after 2s: 5xx")
			assert.Equal(t, 1, st2.Totals.RolledBack)
			assert.Zero(t, st2.Totals.Failed)
			assert.Equal(t, graceful.PhaseServing, st2.Phase)
		})

		t.Run("panicking build rolled back", func(t *testing.T) {
			out, code, st, _ := during(srv, deploy, panicking)
			assert.Equal(t, 1, code, out)
			assert.Contains(t, out, "rolled back: the new process died")
			assert.Equal(t, content(v1), content(live))
			assert.Equal(t, old, srv.PID())
			assert.Equal(t, old, loadtest.ReadPIDFile(srv.PIDFile))
			t.Logf("%sfailures: %v %v", out, st.Failures, st.Samples)
			assert.Zero(t, st.Failures["refused"], "no connection refused: %v", st.Samples)
			// Only requests in flight inside the canary as it died may fail:
			// at most one per client connection.
			assert.LessOrEqual(t, st.Failed(), mix.KeepAliveGET+mix.FreshGET, "%v %v", st.Failures, st.Samples)
		})

		t.Run("slow build rolled back", func(t *testing.T) {
			out, code, st, _ := during(srv, deploy, slow)
			assert.Equal(t, 1, code, out)
			assert.Regexp(t, `rolled back after 2s: p99 [\d.]+ms of [\d,]+ requests vs [\d.]+(µs|ms) of [\d,]+ \(more than 3x\)`, out)
			t.Logf("%s", out)
			assert.Equal(t, old, srv.PID())
			assert.Zero(t, st.Failed(), "%v %v", st.Failures, st.Samples)
		})

		t.Run("good build promoted", func(t *testing.T) {
			out, code, st, _ := during(srv, deploy, v2)
			require.Equal(t, 0, code, out)
			srv.Follow()
			assert.NotEqual(t, old, srv.PID())
			assert.Equal(t, content(v2), content(live))
			assert.Zero(t, st.Failed(), "%v %v", st.Failures, st.Samples)
			canary, first, last := strconv.Itoa(srv.PID()), time.Time{}, time.Time{}
			for _, o := range st.Timeline {
				switch {
				case o.PID == canary && first.IsZero():
					first = o.At
				case o.PID == strconv.Itoa(old):
					last = o.At // until the promotion
				}
			}
			served, all := 0, 0
			for _, o := range st.Timeline {
				if o.At.Before(first) || o.At.After(last) {
					continue
				}
				all++
				if o.PID == canary {
					served++
				}
			}
			require.Positive(t, all)
			t.Logf("canary served %d of %d requests (%.1f%%) over %v of probation", served, all, 100*float64(served)/float64(all), last.Sub(first).Round(time.Millisecond))
			assert.InDelta(t, share, float64(served)/float64(all), 0.05, "the canary's share of %d requests during its probation", all)
			assert.GreaterOrEqual(t, last.Sub(first), window*9/10, "promoted after the window")
		})
	})

	t.Run("latency not judged", func(t *testing.T) {
		const upgradeTimeout = 8 * time.Second
		srv, deploy, _, _ := start(t, "-upgrade-timeout", upgradeTimeout.String())
		old := srv.PID()
		out, code, st, _ := during(srv, deploy, slow)
		require.Equal(t, 0, code, out)
		srv.Follow()
		assert.NotEqual(t, old, srv.PID())
		assert.Zero(t, st.Failed(), "%v %v", st.Failures, st.Samples)

		// No traffic at all: the window goes on, up to half of the time
		// the checks left, then the new version is promoted.
		began := time.Now()
		out, code = deploy(v2)
		took := time.Since(began)
		require.Equal(t, 0, code, out)
		srv.Follow()
		assert.Greater(t, took, window+time.Second, "the window was extended")
		assert.Less(t, took, upgradeTimeout*3/4)
		t.Logf("promoted after %v without traffic", took.Round(time.Millisecond))
	})
}

// waitRequests waits until load has made n more requests, at most 30 s.
func waitRequests(t *testing.T, load *loadtest.Load, n int) {
	t.Helper()
	start, _ := load.Snapshot()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if done, _ := load.Snapshot(); done >= start+n {
			return
		}
		require.False(t, time.Now().After(deadline), "the load made fewer than %d requests in 30 s", n)
	}
}

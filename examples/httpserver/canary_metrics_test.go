package main

import (
	"context"
	"io"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/graceful-go/graceful"
	"github.com/graceful-go/graceful/control"
	"github.com/graceful-go/graceful/internal/loadtest"
)

// TestCanaryMetrics: a scrape of /metrics that reaches a canary on
// probation (a share of 1: every new connection goes to it) finds
// graceful_generation, its own, as from every serving process: the series
// does not vanish for the scrapes that land on the canary.
func TestCanaryMetrics(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	sock := filepath.Join(t.TempDir(), "control.sock")
	srv := loadtest.StartPackage(t, "github.com/graceful-go/graceful/examples/httpserver", loadtest.Config{Args: []string{
		"-control", sock, "-probation", "20s", "-canary-share", "1", "-upgrade-timeout", "50s",
	}})
	// get asks for path on a connection of its own.
	get := func(path string) (pid, body string) {
		t.Helper()
		c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 10 * time.Second}
		resp, err := c.Get("http://" + srv.Addr + path)
		require.NoError(t, err)
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		require.NoError(t, err)
		require.Equal(t, http.StatusOK, resp.StatusCode)
		return resp.Header.Get("X-Pid"), string(b)
	}
	if _, body := get("/metrics"); !assert.Contains(t, body, "\ngraceful_generation 1\n") {
		return
	}
	outcome, canary := upgradeToCanary(t, ctx, sock)
	// The canary emits its generation as its probation begins, on the
	// events' own goroutine: a scrape right after may still miss it, so
	// a few are allowed, each on a connection of its own (the canary's).
	// The old process names the canary a moment before its split begins:
	// from then on, with a share of 1, every new connection is the canary's.
	for i := 0; ; i++ {
		pid, _ := get("/")
		if pid == strconv.Itoa(canary) {
			break
		}
		require.Less(t, i, 1000, "with a share of 1 the canary serves new connections once its window is open")
		time.Sleep(time.Millisecond)
	}
	var body string
	for i := 0; i < 200; i++ {
		_, body = get("/metrics")
		if strings.Contains(body, "\ngraceful_generation ") {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	assert.True(t, strings.Contains(body, "\ngraceful_generation 2\n"), "the canary's metrics have no graceful_generation 2 (its own)")
	require.NoError(t, syscall.Kill(canary, syscall.SIGTERM)) // end the window: rolled back
	select {
	case err := <-outcome:
		assert.ErrorContains(t, err, "rolled back")
	case <-ctx.Done():
		t.Fatal("no outcome")
	}
}

// upgradeToCanary asks the server at sock to upgrade, and returns the
// upgrade's outcome, to come, and the PID of its new process once it is on
// probation (at most 30 s).
func upgradeToCanary(t *testing.T, ctx context.Context, sock string) (<-chan error, int) {
	t.Helper()
	outcome := make(chan error, 1)
	go func() {
		_, err := control.Upgrade(ctx, sock)
		outcome <- err
	}()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		require.False(t, time.Now().After(deadline), "no probation window")
		if st, err := control.Details(ctx, sock); err == nil && len(st.Upgrades) > 0 {
			if u := st.Upgrades[len(st.Upgrades)-1]; u.Outcome == graceful.OutcomeInProgress && u.NewPID != 0 {
				return outcome, u.NewPID
			}
		}
	}
}

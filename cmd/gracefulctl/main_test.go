package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/graceful-go/graceful"
	"github.com/graceful-go/graceful/internal/loadtest"
)

// TestReload is what systemd's ExecReload=gracefulctl sees: exit 0 once the
// new process is ready; exit 1 with the reason when the new binary crashes,
// the old process serving on; exit 2 on bad usage.
func TestReload(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	dir, ctl, server := buildTools(t, ctx)
	good, err := os.ReadFile(server)
	require.NoError(t, err)
	logs, err := os.Create(filepath.Join(dir, "server.log"))
	require.NoError(t, err)
	defer logs.Close()
	sock := filepath.Join(dir, "control.sock")
	srv, err := loadtest.Start(ctx, loadtest.Config{Bin: server, Dir: dir, Logs: logs, Args: []string{"-control", sock, "-upgrade-timeout", "5s"}})
	require.NoError(t, err)
	defer srv.Kill()

	gracefulctl := func(args ...string) (stdout, stderr string, code int) {
		cmd := exec.CommandContext(ctx, ctl, args...)
		var o, e bytes.Buffer
		cmd.Stdout, cmd.Stderr = &o, &e
		err := cmd.Run()
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return o.String(), e.String(), ee.ExitCode()
		}
		require.NoError(t, err)
		return o.String(), e.String(), 0
	}
	deploy := func(content []byte) {
		require.NoError(t, loadtest.WriteExecutable(server, bytes.NewReader(content)))
	}

	_, stderr, code := gracefulctl("upgrade")
	assert.Equal(t, 2, code)
	assert.Contains(t, stderr, "usage: gracefulctl -socket PATH")
	_, stderr, code = gracefulctl("-socket", sock, "restart")
	assert.Equal(t, 2, code)
	assert.Contains(t, stderr, `unknown command "restart"`)
	_, stderr, code = gracefulctl("-socket", filepath.Join(dir, "missing.sock"), "upgrade")
	assert.Equal(t, 1, code)
	assert.Contains(t, stderr, "no such file or directory")

	old := srv.PID()
	deploy([]byte("#!/bin/sh\necho 'new version: cannot start' >&2\nexit 3\n"))
	_, stderr, code = gracefulctl("-socket", sock, "upgrade")
	assert.Equal(t, 1, code)
	assert.Contains(t, stderr, "gracefulctl: upgrade failed after")
	assert.Contains(t, stderr, "exit status 3")
	stdout, _, code := gracefulctl("-socket", sock, "status")
	assert.Equal(t, 0, code)
	first, rest, _ := strings.Cut(stdout, "\n")
	assert.Equal(t, "pid "+strconv.Itoa(old)+" serving", first, "the old process serves on")
	assert.Contains(t, rest, "generation 1, build ")
	assert.Contains(t, rest, "upgrades: 0 succeeded, 1 failed")
	assert.Regexp(t, `failed +pid `+strconv.Itoa(old)+` -> \? \(generation 2\), after .*exit status 3`, rest)

	deploy(good)
	stdout, stderr, code = gracefulctl("-socket", sock, "upgrade")
	require.Equal(t, 0, code, stderr)
	successor := loadtest.ReadPIDFile(srv.PIDFile)
	assert.NotEqual(t, old, successor)
	assert.Contains(t, stdout, "upgraded: pid "+strconv.Itoa(successor)+" ready after")
	exit, err := srv.WaitExit(ctx, old)
	require.NoError(t, err)
	assert.Equal(t, 0, exit)
	srv.Follow()
	stdout, _, code = gracefulctl("-socket", sock, "-timeout", "5s", "status")
	assert.Equal(t, 0, code)
	first, _, _ = strings.Cut(stdout, "\n")
	assert.Equal(t, "pid "+strconv.Itoa(successor)+" serving", first)

	// The new process knows the upgrades that led to it, the failed one
	// too, and hears how the old one drained (told before it exited; the
	// new one reads it in its own time).
	var st graceful.Status
	for i := 0; ; i++ {
		stdout, stderr, code = gracefulctl("-socket", sock, "status", "-json")
		require.Equal(t, 0, code, stderr)
		require.NoError(t, json.Unmarshal([]byte(stdout), &st), stdout)
		if len(st.Upgrades) == 2 && st.Upgrades[1].Drain != nil || i == 100 {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	assert.Equal(t, successor, st.PID)
	assert.Equal(t, 2, st.Generation)
	assert.Equal(t, graceful.PhaseServing, st.Phase)
	require.Len(t, st.Upgrades, 2, stdout)
	assert.Equal(t, graceful.OutcomeFailed, st.Upgrades[0].Outcome)
	assert.Contains(t, st.Upgrades[0].Err, "exit status 3")
	u := st.Upgrades[1]
	assert.Equal(t, graceful.OutcomeSucceeded, u.Outcome)
	assert.Equal(t, old, u.OldPID)
	assert.Equal(t, successor, u.NewPID)
	assert.Positive(t, u.Duration)
	if assert.NotNil(t, u.Drain, "the old process's drain report") {
		assert.Positive(t, u.Drain.Duration)
	}
	assert.Equal(t, graceful.Totals{Succeeded: 1, Failed: 1, Drains: 1, Drain: *u.Drain}, st.Totals)
	_, stderr, code = gracefulctl("-socket", sock, "status", "-yaml")
	assert.Equal(t, 2, code, stderr)
	if t.Failed() {
		b, _ := os.ReadFile(logs.Name())
		t.Logf("server logs:\n%s", b)
	}
}

// buildTools builds gracefulctl and the reference server into a temporary
// directory, which it returns with their paths.
func buildTools(t *testing.T, ctx context.Context) (dir, ctl, server string) {
	t.Helper()
	dir = t.TempDir()
	ctl, err := loadtest.Build(ctx, dir, "github.com/graceful-go/graceful/cmd/gracefulctl", false)
	require.NoError(t, err)
	server, err = loadtest.Build(ctx, dir, "github.com/graceful-go/graceful/examples/httpserver", false)
	require.NoError(t, err)
	return dir, ctl, server
}

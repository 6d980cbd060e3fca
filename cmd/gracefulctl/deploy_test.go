package main

import (
	"context"
	"errors"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/graceful-go/graceful/internal/loadtest"
)

// TestDeploy: deploy installs a new build at the running binary's path and
// upgrades; a build that crashes is refused, the previous binary is back at
// the path byte for byte, and a cold restart starts the good version;
// rollback returns to the previous build; files the server could not start
// are refused before anything changes.
func TestDeploy(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	dir := t.TempDir()
	ctl, err := loadtest.Build(ctx, dir, "github.com/graceful-go/graceful/cmd/gracefulctl", false)
	require.NoError(t, err)
	v1, err := loadtest.BuildWith(ctx, filepath.Join(dir, "v1"), "github.com/graceful-go/graceful/examples/httpserver", false, "-X main.version=v1")
	require.NoError(t, err)
	v2, err := loadtest.BuildWith(ctx, filepath.Join(dir, "v2"), "github.com/graceful-go/graceful/examples/httpserver", false, "-X main.version=v2")
	require.NoError(t, err)
	crash := filepath.Join(dir, "crash")
	require.NoError(t, os.WriteFile(crash, []byte("#!/bin/sh\necho 'broken build' >&2\nexit 3\n"), 0o755))

	live := filepath.Join(dir, "srv", "httpserver") // what the server runs, and deploys replace
	require.NoError(t, os.MkdirAll(filepath.Dir(live), 0o755))
	good, err := os.ReadFile(v1)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(live, good, 0o755))
	sock := filepath.Join(dir, "control.sock")
	logs, err := os.Create(filepath.Join(dir, "server.log"))
	require.NoError(t, err)
	defer logs.Close()
	srv, err := loadtest.Start(ctx, loadtest.Config{Bin: live, Dir: dir, Logs: logs, Args: []string{"-control", sock, "-upgrade-timeout", "5s"}})
	require.NoError(t, err)
	defer srv.Kill()
	gracefulctl := func(args ...string) (string, int) {
		cmd := exec.CommandContext(ctx, ctl, append([]string{"-socket", sock}, args...)...)
		out, err := cmd.CombinedOutput()
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return string(out), ee.ExitCode()
		}
		require.NoError(t, err)
		return string(out), 0
	}
	version := func() string {
		resp, err := http.Get("http://" + srv.Addr + "/")
		require.NoError(t, err)
		resp.Body.Close()
		return resp.Header.Get("X-Version")
	}
	content := func(path string) []byte {
		b, err := os.ReadFile(path)
		require.NoError(t, err)
		return b
	}
	require.Equal(t, "v1", version())

	// Refused before anything changes.
	notExec := filepath.Join(dir, "notexec")
	require.NoError(t, os.WriteFile(notExec, good, 0o644))
	garbage := filepath.Join(dir, "garbage")
	require.NoError(t, os.WriteFile(garbage, []byte("not a program at all"), 0o755))
	for file, want := range map[string]string{filepath.Join(dir, "missing"): "no such file", notExec: "is not executable", garbage: "is not a program for", dir: "is not a regular file"} {
		out, code := gracefulctl("deploy", file)
		assert.Equal(t, 1, code, out)
		assert.Contains(t, out, want)
	}
	assert.Equal(t, good, content(live))
	assert.NoFileExists(t, live+".previous")
	out, code := gracefulctl("rollback")
	assert.Equal(t, 1, code)
	assert.Contains(t, out, "nothing to roll back to")

	// A build that crashes: refused, the good binary back at the path.
	old := srv.PID()
	out, code = gracefulctl("deploy", crash)
	assert.Equal(t, 1, code, out)
	assert.Contains(t, out, "exit status 3")
	assert.Contains(t, out, "the previous binary is back at "+live)
	assert.Equal(t, good, content(live), "byte for byte")
	assert.Equal(t, old, srv.PID())
	assert.Equal(t, "v1", version())
	entries, err := os.ReadDir(filepath.Dir(live))
	require.NoError(t, err)
	for _, e := range entries {
		assert.Contains(t, []string{"httpserver", "httpserver.previous", ".httpserver.deploy-lock"}, e.Name(), "no temporary file left (the lock file stays)")
	}

	// A good one.
	out, code = gracefulctl("deploy", v2)
	require.Equal(t, 0, code, out)
	srv.Follow()
	assert.Equal(t, "v2", version())
	assert.Equal(t, content(v2), content(live))
	assert.Equal(t, good, content(live+".previous"))

	// Back.
	out, code = gracefulctl("rollback")
	require.Equal(t, 0, code, out)
	srv.Follow()
	assert.Equal(t, "v1", version())
	assert.Equal(t, good, content(live))
	assert.Equal(t, content(v2), content(live+".previous"))

	// After a refused deploy, a cold restart starts the good version.
	_, code = gracefulctl("deploy", crash)
	require.Equal(t, 1, code)
	_, err = srv.Stop(ctx, time.Minute)
	require.NoError(t, err)
	srv2, err := loadtest.Start(ctx, loadtest.Config{Bin: live, Dir: t.TempDir(), Logs: logs, Addr: srv.Addr})
	require.NoError(t, err)
	defer srv2.Kill()
	srv = srv2
	assert.Equal(t, "v1", version())
	if t.Failed() {
		b, _ := os.ReadFile(logs.Name())
		t.Logf("server logs:\n%s", b)
	}
}

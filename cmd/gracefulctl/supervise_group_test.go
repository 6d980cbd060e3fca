//go:build linux

package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/graceful-go/graceful/internal/loadtest"
)

// killGroupOf returns a function that SIGKILLs pid's process group as it
// is now (a test's cleanup: every generation, and the warden, are in it).
func killGroupOf(pid int) func() {
	pgid, err := syscall.Getpgid(pid)
	return func() {
		if err == nil && pgid > 1 {
			syscall.Kill(-pgid, syscall.SIGKILL)
		}
	}
}

// wardenOf waits for the warden among sup's children and returns it.
func wardenOf(t *testing.T, sup int) int {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		for _, c := range loadtest.Children(sup) {
			if isWarden(c) {
				return c
			}
		}
		require.False(t, time.Now().After(deadline), "supervisor %d has no warden", sup)
	}
}

// TestSuperviseWardenGroup (review of the warden, items 1 and 6): the
// server runs in the warden's own process group, whose number (the
// warden's PID) cannot name another group while the warden lives, and a
// new generation inherits it. The warden ignores SIGTERM, as systemd's
// default KillMode=control-group sends it to every process of the
// service: SIGTERM to the warden, then SIGKILL to the supervisor, and the
// warden still stops the server.
func TestSuperviseWardenGroup(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	require.NoError(t, loadtest.BecomeSubreaper())
	dir, ctl, server := buildTools(t, ctx)
	sup, exited, addr, pidfile := startSupervised(t, ctx, dir, ctl, server)
	srv := loadtest.ReadPIDFile(pidfile)
	defer killGroupOf(srv)()
	warden := wardenOf(t, sup.Process.Pid)

	wpg, err := syscall.Getpgid(warden)
	require.NoError(t, err)
	assert.Equal(t, warden, wpg, "the warden leads a process group of its own")
	pg, err := syscall.Getpgid(srv)
	require.NoError(t, err)
	assert.Equal(t, warden, pg, "the server is in the warden's process group")

	require.NoError(t, sup.Process.Signal(syscall.SIGHUP))
	for deadline := time.Now().Add(30 * time.Second); loadtest.ReadPIDFile(pidfile) == srv; time.Sleep(10 * time.Millisecond) {
		require.False(t, time.Now().After(deadline), "no new generation")
	}
	next := onlyChildBut(t, "upgrade", sup.Process.Pid, srv)
	pg, err = syscall.Getpgid(next)
	require.NoError(t, err)
	assert.Equal(t, warden, pg, "the new generation is in the warden's process group")

	answer := slowInFlight(ctx, t, addr, 1500)
	require.NoError(t, syscall.Kill(warden, syscall.SIGTERM))
	require.NoError(t, sup.Process.Kill())
	assert.Equal(t, -1, <-exited, "killed")
	require.True(t, waitGone(next, 60*time.Second), "the server (pid %d) outlives its supervisor, killed after its warden got SIGTERM", next)
	assert.Equal(t, 200, <-answer, "the request in flight when the supervisor was killed")
	assert.True(t, waitGone(warden, 60*time.Second), "the warden (pid %d) outlives the server", warden)
}

// TestSuperviseSignalWhileAdopting (review item 4): a SIGHUP to the
// supervisor while it waits for a process the server command left behind
// (the command exited 0 before it was ready) is not sent to that process,
// which has no handler for it yet (a shell, whose default action
// terminates): it waits for the process to be followed as the server, and
// is passed on then (an upgrade).
func TestSuperviseSignalWhileAdopting(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	require.NoError(t, loadtest.BecomeSubreaper())
	dir, ctl, server := buildTools(t, ctx)
	addr, err := loadtest.FreeAddr()
	require.NoError(t, err)
	pidfile, left, gofile := filepath.Join(dir, "server.pid"), filepath.Join(dir, "left.pid"), filepath.Join(dir, "go")
	// The process left behind writes its PID, waits (bounded) for the
	// test's go-ahead, and becomes the server.
	script := `echo $$ > "$LEFT"; i=0; while [ ! -e "$GOFILE" ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done; exec "$0" "$@"`
	sup := exec.Command(ctl, "supervise", "--", "sh", "-c", `s=$1; shift; sh -c "$s" "$0" "$@" & exit 0`, server, script, "-addr", addr, "-pidfile", pidfile)
	sup.Env = append(os.Environ(), "LEFT="+left, "GOFILE="+gofile)
	exited := startWatched(t, sup)
	var l int
	for deadline := time.Now().Add(30 * time.Second); l == 0; time.Sleep(5 * time.Millisecond) {
		require.False(t, time.Now().After(deadline), "the command left nothing behind")
		l = loadtest.ReadPIDFile(left)
	}
	defer syscall.Kill(l, syscall.SIGKILL)
	// The command has exited and been reaped: l is the supervisor's only
	// child, and the supervisor waits for it to declare itself ready.
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		all, zombies := childrenOf(sup.Process.Pid)
		if len(all) == 1 && all[0] == l && zombies == 0 {
			break
		}
		require.False(t, time.Now().After(deadline), "the command's exit: the supervisor has children %v (%d zombies)", all, zombies)
	}

	require.NoError(t, sup.Process.Signal(syscall.SIGHUP))
	require.NoError(t, os.WriteFile(gofile, nil, 0o644))
	require.NoError(t, loadtest.WaitReady(ctx, addr), "the process left behind did not survive the SIGHUP")
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		require.False(t, time.Now().After(deadline), "the SIGHUP was never passed on to the server")
		if p := loadtest.ReadPIDFile(pidfile); p != 0 && p != l {
			break // a new generation: the upgrade asked for
		}
	}
	next := onlyChildBut(t, "upgrade", sup.Process.Pid, l)
	defer syscall.Kill(next, syscall.SIGKILL)

	require.NoError(t, sup.Process.Signal(syscall.SIGTERM))
	select {
	case code := <-exited:
		assert.Equal(t, 0, code)
		assert.False(t, loadtest.Alive(next))
	case <-time.After(60 * time.Second):
		t.Fatal("the supervisor did not exit")
	}
}

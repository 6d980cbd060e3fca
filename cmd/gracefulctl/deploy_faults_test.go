package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/graceful-go/graceful"
	"github.com/graceful-go/graceful/control"
	"github.com/graceful-go/graceful/internal/loadtest"
)

// deployEnv is a reference server run from a path of its own (live), which
// deploys replace, with gracefulctl and the builds to deploy.
type deployEnv struct {
	t          *testing.T
	ctx        context.Context
	dir        string
	ctl        string
	bins       map[string]string // version -> a build of the reference server
	live, sock string
	srv        *loadtest.Server
}

// newDeployEnv builds gracefulctl and each version of the reference server
// (name -> extra ldflags), and starts v1 at live with args.
func newDeployEnv(t *testing.T, ctx context.Context, versions map[string]string, args ...string) *deployEnv {
	t.Helper()
	e := &deployEnv{t: t, ctx: ctx, dir: t.TempDir(), bins: map[string]string{}}
	var err error
	e.ctl, err = loadtest.Build(ctx, e.dir, "github.com/graceful-go/graceful/cmd/gracefulctl", false)
	require.NoError(t, err)
	versions["v1"] = ""
	for v, ld := range versions {
		e.bins[v], err = loadtest.BuildWith(ctx, filepath.Join(e.dir, v), "github.com/graceful-go/graceful/examples/httpserver", false, "-X main.version="+v+" "+ld)
		require.NoError(t, err)
	}
	e.live = filepath.Join(e.dir, "srv", "httpserver")
	require.NoError(t, os.MkdirAll(filepath.Dir(e.live), 0o755))
	require.NoError(t, os.WriteFile(e.live, e.content(e.bins["v1"]), 0o755))
	e.start(args...)
	return e
}

// start starts the server at e.live.
func (e *deployEnv) start(args ...string) {
	t := e.t
	sdir := t.TempDir()
	e.sock = filepath.Join(sdir, "control.sock")
	logs, err := os.Create(filepath.Join(sdir, "server.log"))
	require.NoError(t, err)
	e.srv, err = loadtest.Start(e.ctx, loadtest.Config{Bin: e.live, Dir: sdir, Logs: logs, Args: append([]string{"-control", e.sock, "-upgrade-timeout", "30s"}, args...)})
	require.NoError(t, err)
	srv := e.srv
	t.Cleanup(func() {
		srv.Kill()
		logs.Close()
		if t.Failed() {
			b, _ := os.ReadFile(logs.Name())
			t.Logf("server logs:\n%s", b)
		}
	})
}

// command returns gracefulctl with args, its output going to out.
func (e *deployEnv) command(out *bytes.Buffer, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(e.ctx, e.ctl, append([]string{"-socket", e.sock}, args...)...)
	cmd.Stdout, cmd.Stderr = out, out
	return cmd
}

// exitCode is cmd's exit code once err is what its Wait returned.
func exitCode(t *testing.T, err error) int {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	require.NoError(t, err)
	return 0
}

// run runs gracefulctl with args and returns its output and exit code; the
// server is followed to its new generation.
func (e *deployEnv) run(args ...string) (string, int) {
	var out bytes.Buffer
	code := exitCode(e.t, e.command(&out, args...).Run())
	e.srv.Follow()
	return out.String(), code
}

// served returns the version that answers a request on a new connection.
func (e *deployEnv) served() string {
	c := &http.Client{Transport: loadtest.NewTransport("", true), Timeout: 10 * time.Second}
	resp, err := c.Get("http://" + e.srv.Addr + "/")
	require.NoError(e.t, err)
	resp.Body.Close()
	return resp.Header.Get("X-Version")
}

func (e *deployEnv) content(path string) []byte {
	b, err := os.ReadFile(path)
	require.NoError(e.t, err)
	return b
}

// which names the build whose bytes the file at path holds ("" if none).
func (e *deployEnv) which(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return "missing"
	}
	for v, bin := range e.bins {
		if bytes.Equal(b, e.content(bin)) {
			return v
		}
	}
	return fmt.Sprintf("none (%d bytes)", len(b))
}

// disk is what PATH and PATH.previous are: the builds and the files.
type disk struct {
	path, prev     string
	pathFI, prevFI os.FileInfo
}

func (e *deployEnv) disk() disk {
	d := disk{path: e.which(e.live), prev: e.which(e.live + ".previous")}
	d.pathFI, _ = os.Lstat(e.live)
	d.prevFI, _ = os.Lstat(e.live + ".previous")
	return d
}

// unchanged asserts that the disk holds the very files of before.
func (e *deployEnv) unchanged(before disk, msg string) {
	after := e.disk()
	assert.Equal(e.t, before.path, after.path, "%s: PATH", msg)
	assert.Equal(e.t, before.prev, after.prev, "%s: PATH.previous", msg)
	if assert.NotNil(e.t, after.pathFI) {
		assert.True(e.t, os.SameFile(before.pathFI, after.pathFI), "%s: PATH is the same file as before", msg)
	}
	if before.prevFI != nil && assert.NotNil(e.t, after.prevFI, msg) {
		assert.True(e.t, os.SameFile(before.prevFI, after.prevFI), "%s: PATH.previous is the same file as before", msg)
	}
	e.distinct(msg)
}

// distinct asserts that PATH and PATH.previous are not one file.
func (e *deployEnv) distinct(msg string) {
	a, aerr := os.Lstat(e.live)
	b, berr := os.Lstat(e.live + ".previous")
	if aerr == nil && berr == nil {
		assert.False(e.t, os.SameFile(a, b), "%s: PATH and PATH.previous are one file", msg)
	}
}

// noTemp asserts that the binary's directory holds nothing but extra and
// the binary, its previous one and the lock file (which stays, empty
// once no one holds it).
func (e *deployEnv) noTemp(msg string, extra ...string) {
	entries, err := os.ReadDir(filepath.Dir(e.live))
	require.NoError(e.t, err)
	for _, de := range entries {
		assert.Contains(e.t, append([]string{"httpserver", "httpserver.previous", lockBase}, extra...), de.Name(), "%s: no temporary file left", msg)
	}
	if fi, err := os.Lstat(lockName(e.live)); err == nil {
		assert.True(e.t, fi.Mode().IsRegular(), "%s: the lock file is a regular file", msg)
		assert.Zero(e.t, fi.Size(), "%s: the lock file is empty once released", msg)
	}
}

// lockBase is the name of the lock file of deploys of a binary named
// httpserver.
const lockBase = ".httpserver.deploy-lock"

// totals returns the server's upgrade totals.
func (e *deployEnv) totals() graceful.Totals {
	st, err := control.Details(e.ctx, e.sock)
	require.NoError(e.t, err)
	return st.Totals
}

// TestDeployRefusedChangesNothing (issue 20 item 5): after a deploy of v2,
// a refused crashing build and a canary rolled back leave PATH (v2) and
// PATH.previous (v1) as they were, the very files; rollback then returns
// to v1.
func TestDeployRefusedChangesNothing(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	e := newDeployEnv(t, ctx, map[string]string{"v2": "", "failing": "-X main.failRate=0.5"}, "-probation", "1s", "-canary-share", "0.5")
	crash := filepath.Join(e.dir, "crash")
	require.NoError(t, os.WriteFile(crash, []byte("#!/bin/sh\necho 'broken build' >&2\nexit 3\n"), 0o755))

	load := loadtest.StartLoad(e.srv.Addr, loadtest.Mix{KeepAliveGET: 8, FreshGET: 2})
	defer load.Stop()
	waitRequests(t, load, 100)
	out, code := e.run("deploy", e.bins["v2"])
	require.Equal(t, 0, code, out)
	require.Equal(t, disk{path: "v2", prev: "v1"}, disk{path: e.which(e.live), prev: e.which(e.live + ".previous")})

	before := e.disk()
	out, code = e.run("deploy", crash)
	assert.Equal(t, 1, code, out)
	assert.Contains(t, out, "exit status 3")
	e.unchanged(before, "a crashing build refused")

	waitRequests(t, load, 100)
	out, code = e.run("deploy", e.bins["failing"])
	assert.Equal(t, 1, code, out)
	assert.Contains(t, out, "rolled back")
	assert.Contains(t, out, "the previous binary is back at "+e.live)
	e.unchanged(before, "a canary rolled back")
	e.noTemp("after the refusals")
	assert.Equal(t, "v2", e.served())

	waitRequests(t, load, 100)
	out, code = e.run("rollback")
	require.Equal(t, 0, code, out)
	assert.Equal(t, "v1", e.served())
	assert.Equal(t, "v1", e.which(e.live))
	assert.Equal(t, "v2", e.which(e.live+".previous"))
	e.distinct("after the rollback")
	e.noTemp("after the rollback")
}

// TestDeployConcurrent (issue 20 item 6): two deploys started together run
// one after the other: each reports the build that served when it ended,
// and the disk holds what serves, the other build as PATH.previous.
func TestDeployConcurrent(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	e := newDeployEnv(t, ctx, map[string]string{"v2": "", "v3": ""})
	for round := range 5 {
		var outs [2]bytes.Buffer
		var codes [2]int
		var ended [2]time.Time
		var wg sync.WaitGroup
		for i, v := range []string{"v2", "v3"} {
			cmd := e.command(&outs[i], "deploy", e.bins[v])
			wg.Go(func() {
				codes[i] = exitCode(t, cmd.Run())
				ended[i] = time.Now()
			})
		}
		wg.Wait()
		e.srv.Follow()
		for i := range 2 {
			require.Equal(t, 0, codes[i], "round %d: %s", round, outs[i].String())
		}
		last, other := "v3", "v2"
		if ended[0].After(ended[1]) {
			last, other = "v2", "v3"
		}
		assert.Equal(t, last, e.served(), "round %d: the deploy that ended last serves", round)
		assert.Equal(t, last, e.which(e.live), "round %d: the disk holds what serves", round)
		assert.Equal(t, other, e.which(e.live+".previous"), "round %d", round)
		e.distinct(fmt.Sprintf("round %d", round))
		e.noTemp(fmt.Sprintf("round %d", round))
		if t.Failed() {
			t.Logf("round %d:\n%s\n%s", round, outs[0].String(), outs[1].String())
			return
		}
	}
}

// TestDeployInterrupted (issue 20 item 7): a deploy that gives up waiting
// (-timeout, SIGINT) during a probation waits for the server's outcome and
// makes the disk match it: the good build promoted stays at PATH (exit 0),
// the failing one rolled back leaves the previous binary there (exit 1);
// each says what happened.
func TestDeployInterrupted(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	e := newDeployEnv(t, ctx, map[string]string{"v2": "", "v3": "", "failing": "-X main.failRate=0.5"}, "-probation", "3s", "-canary-share", "0.5")
	load := loadtest.StartLoad(e.srv.Addr, loadtest.Mix{KeepAliveGET: 8, FreshGET: 2})
	defer load.Stop()

	// onProbation starts gracefulctl with args and interrupts it with sig
	// once the server's attempt is in progress (the canary on probation).
	onProbation := func(sigs []os.Signal, args ...string) (string, int) {
		waitRequests(t, load, 100)
		var out bytes.Buffer
		cmd := e.command(&out, args...)
		require.NoError(t, cmd.Start())
		for deadline := time.Now().Add(time.Minute); ; time.Sleep(10 * time.Millisecond) {
			st, err := control.Details(ctx, e.sock)
			require.NoError(t, err)
			if n := len(st.Upgrades); n > 0 && st.Upgrades[n-1].Outcome == graceful.OutcomeInProgress && st.Upgrades[n-1].NewPID != 0 {
				break
			}
			require.False(t, time.Now().After(deadline), "no upgrade in progress")
		}
		for _, sig := range sigs {
			require.NoError(t, cmd.Process.Signal(sig))
		}
		code := exitCode(t, cmd.Wait())
		e.srv.Follow()
		t.Logf("gracefulctl %s (exit %d):\n%s", strings.Join(args, " "), code, out.String())
		return out.String(), code
	}

	out, code := onProbation(nil, "-timeout", "1s", "deploy", e.bins["v2"])
	assert.Equal(t, 0, code, out)
	assert.Contains(t, out, "-timeout 1s reached after asking for the upgrade")
	assert.Equal(t, "v2", e.served())
	assert.Equal(t, "v2", e.which(e.live), "promoted: the new build stays")
	assert.Equal(t, "v1", e.which(e.live+".previous"))

	out, code = onProbation([]os.Signal{os.Interrupt}, "deploy", e.bins["v3"])
	assert.Equal(t, 0, code, out)
	assert.Contains(t, out, "interrupted (interrupt) after asking for the upgrade")
	assert.Equal(t, "v3", e.served())
	assert.Equal(t, "v3", e.which(e.live))
	assert.Equal(t, "v2", e.which(e.live+".previous"))

	before := e.disk()
	out, code = onProbation([]os.Signal{syscall.SIGTERM}, "deploy", e.bins["failing"])
	assert.Equal(t, 1, code, out)
	assert.Contains(t, out, "interrupted (terminated) after asking for the upgrade")
	assert.Contains(t, out, "rolled back")
	assert.Contains(t, out, "the previous binary is back at "+e.live)
	assert.Equal(t, "v3", e.served())
	e.unchanged(before, "rolled back after an interruption")
	e.noTemp("after the interruptions")

	// Interrupted twice: the command stops waiting, asks the server's
	// record once, and says it had not decided; the new build stays at
	// PATH, and once promoted the disk holds what serves.
	out, code = onProbation([]os.Signal{os.Interrupt, syscall.SIGTERM}, "deploy", e.bins["v2"])
	assert.Equal(t, 1, code, out)
	assert.Contains(t, out, "the server had not decided")
	assert.Contains(t, out, "if the upgrade fails, run gracefulctl rollback")
	assert.Equal(t, "v2", e.which(e.live))
	assert.Equal(t, "v3", e.which(e.live+".previous"))
	e.noTemp("after a double interruption")
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(10 * time.Millisecond) {
		st, err := control.Details(ctx, e.sock)
		require.NoError(t, err)
		if n := len(st.Upgrades); st.Upgrades[n-1].Outcome != graceful.OutcomeInProgress {
			require.Equal(t, graceful.OutcomeSucceeded, st.Upgrades[n-1].Outcome)
			break
		}
		require.False(t, time.Now().After(deadline), "the probation did not end")
	}
	e.srv.Follow()
	assert.Equal(t, "v2", e.served())
}

// TestDeployPreviousNotAFile (issue 20 item 8): a PATH.previous that is a
// directory is refused before anything changes; one that is a symbolic
// link comes back as it was after a refusal, and is replaced (not its
// target) by a deploy that succeeds.
func TestDeployPreviousNotAFile(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	e := newDeployEnv(t, ctx, map[string]string{"v2": ""})
	prev := e.live + ".previous"
	require.NoError(t, os.MkdirAll(filepath.Join(prev, "sub"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(prev, "keep"), []byte("mine"), 0o644))
	before, _ := os.Lstat(e.live)
	out, code := e.run("deploy", e.bins["v2"])
	assert.Equal(t, 1, code, out)
	assert.Contains(t, out, prev+" is a directory")
	after, _ := os.Lstat(e.live)
	assert.True(t, os.SameFile(before, after), "PATH untouched")
	assert.Equal(t, "v1", e.which(e.live))
	assert.Equal(t, []byte("mine"), e.content(filepath.Join(prev, "keep")))
	assert.Equal(t, "v1", e.served())
	assert.Zero(t, e.totals().Failed, "no upgrade was tried")
	e.noTemp("a directory at PATH.previous")
	require.NoError(t, os.RemoveAll(prev))

	target := filepath.Join(e.dir, "elsewhere")
	require.NoError(t, os.WriteFile(target, []byte("not to be touched"), 0o644))
	require.NoError(t, os.Symlink(target, prev))
	crash := filepath.Join(e.dir, "crash")
	require.NoError(t, os.WriteFile(crash, []byte("#!/bin/sh\nexit 3\n"), 0o755))
	linkFI, _ := os.Lstat(prev)
	out, code = e.run("deploy", crash)
	assert.Equal(t, 1, code, out)
	fi, err := os.Lstat(prev)
	require.NoError(t, err)
	assert.True(t, os.SameFile(linkFI, fi), "the link is back as it was")
	out, code = e.run("deploy", e.bins["v2"])
	require.Equal(t, 0, code, out)
	assert.Equal(t, "v2", e.served())
	assert.Equal(t, "v2", e.which(e.live))
	fi, err = os.Lstat(prev)
	require.NoError(t, err)
	assert.True(t, fi.Mode().IsRegular(), "the link replaced by the previous binary")
	assert.Equal(t, "v1", e.which(prev))
	assert.Equal(t, []byte("not to be touched"), e.content(target))
	e.noTemp("a link at PATH.previous")
}

// TestRollbackSymlink (issue 20 item 9): rollback with PATH.previous a
// symbolic link installs a copy of the file it leads to, never the link,
// and later deploys work.
func TestRollbackSymlink(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	e := newDeployEnv(t, ctx, map[string]string{"v2": ""})
	require.NoError(t, os.Symlink(e.bins["v2"], e.live+".previous"))
	out, code := e.run("rollback")
	require.Equal(t, 0, code, out)
	assert.Equal(t, "v2", e.served())
	fi, err := os.Lstat(e.live)
	require.NoError(t, err)
	assert.True(t, fi.Mode().IsRegular(), "PATH is a file, not the link")
	assert.Equal(t, "v2", e.which(e.live))
	assert.Equal(t, "v1", e.which(e.live+".previous"))
	out, code = e.run("deploy", e.bins["v1"])
	require.Equal(t, 0, code, out)
	assert.Equal(t, "v1", e.served())
	e.distinct("after the rollback and a deploy")
	e.noTemp("after the rollback and a deploy")

	// Nothing to roll back to: the same bytes.
	require.NoError(t, os.Remove(e.live+".previous"))
	require.NoError(t, os.WriteFile(e.live+".previous", e.content(e.live), 0o755))
	out, code = e.run("rollback")
	assert.Equal(t, 1, code, out)
	assert.Contains(t, out, "nothing to roll back to: "+e.live+".previous holds the same bytes as "+e.live)
}

// TestDeployRewrittenBinary (issue 20 item 10): NEWBINARY rewritten in
// place while deploys run: every deploy either installs a whole build, the
// one that then serves, or is refused before any upgrade (no upgrade ever
// starts a torn binary), the disk unchanged.
func TestDeployRewrittenBinary(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	e := newDeployEnv(t, ctx, map[string]string{"v2": "", "v3": ""})
	next := filepath.Join(e.dir, "next")
	builds := [][]byte{e.content(e.bins["v2"]), e.content(e.bins["v3"])}
	rewrite := func(b []byte) {
		f, err := os.OpenFile(next, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o755)
		require.NoError(t, err)
		for chunk := range slices.Chunk(b, 256<<10) {
			_, err = f.Write(chunk)
			require.NoError(t, err)
		}
		require.NoError(t, f.Close())
	}
	rewrite(builds[0])
	var refused, installed int
	for round := range 10 {
		quiet := round%2 == 1 // no rewrite: the deploy must succeed
		before := e.disk()
		failed := e.totals().Failed
		var out bytes.Buffer
		cmd := e.command(&out, "deploy", next)
		require.NoError(t, cmd.Start())
		done := make(chan int, 1)
		go func() { done <- exitCode(t, cmd.Wait()) }()
		var code int
	rewriting:
		for i := 0; ; i++ {
			select {
			case code = <-done:
				break rewriting
			default:
				if quiet {
					code = <-done
					break rewriting
				}
				rewrite(builds[i%2])
			}
		}
		if quiet {
			assert.Equal(t, 0, code, "round %d: the file was whole: %s", round, out.String())
		}
		e.srv.Follow()
		if code == 0 {
			installed++
			v := e.which(e.live)
			assert.Contains(t, []string{"v2", "v3"}, v, "round %d: a whole build installed: %s", round, out.String())
			assert.Equal(t, v, e.served(), "round %d: what is installed serves", round)
		} else {
			refused++
			assert.Regexp(t, `changed while it was being (copied|read)|is not a program|is too short`, out.String(), "round %d", round)
			e.unchanged(before, fmt.Sprintf("round %d: refused", round))
			assert.Equal(t, failed, e.totals().Failed, "round %d: refused before any upgrade: %s", round, out.String())
		}
		e.noTemp(fmt.Sprintf("round %d", round))
		if t.Failed() {
			return
		}
	}
	t.Logf("%d installed, %d refused", installed, refused)
	assert.Positive(t, refused, "the rewrites were seen")
}

// TestDeployAfterFailedDeploy (issue 20 item 11): after a failed deploy,
// PATH and PATH.previous are two files and the next deploy leaves no
// temporary file; a PATH.previous that is PATH's own file (an older
// gracefulctl left it so) gets a file of its own.
func TestDeployAfterFailedDeploy(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	e := newDeployEnv(t, ctx, map[string]string{"v2": "", "v3": ""})
	crash := filepath.Join(e.dir, "crash")
	require.NoError(t, os.WriteFile(crash, []byte("#!/bin/sh\nexit 3\n"), 0o755))
	out, code := e.run("deploy", e.bins["v2"])
	require.Equal(t, 0, code, out)
	out, code = e.run("deploy", crash)
	require.Equal(t, 1, code, out)
	e.distinct("after a failed deploy")
	out, code = e.run("deploy", e.bins["v3"])
	require.Equal(t, 0, code, out)
	e.noTemp("the deploy after a failed one")
	assert.Equal(t, "v3", e.which(e.live))
	assert.Equal(t, "v2", e.which(e.live+".previous"))

	// PATH.previous a second name of PATH.
	require.NoError(t, os.Remove(e.live+".previous"))
	require.NoError(t, os.Link(e.live, e.live+".previous"))
	before := e.disk()
	out, code = e.run("deploy", crash)
	require.Equal(t, 1, code, out)
	assert.Equal(t, "v3", e.which(e.live))
	assert.Equal(t, "v3", e.which(e.live+".previous"))
	after, _ := os.Lstat(e.live)
	assert.True(t, os.SameFile(before.pathFI, after), "PATH is the file of before")
	e.distinct("a refused deploy with PATH.previous PATH's own file")
	e.noTemp("a refused deploy with PATH.previous PATH's own file")
	require.NoError(t, os.Remove(e.live+".previous"))
	require.NoError(t, os.Link(e.live, e.live+".previous"))
	out, code = e.run("deploy", e.bins["v1"])
	require.Equal(t, 0, code, out)
	assert.Equal(t, "v1", e.which(e.live))
	assert.Equal(t, "v3", e.which(e.live+".previous"))
	e.distinct("a deploy with PATH.previous PATH's own file")
	e.noTemp("a deploy with PATH.previous PATH's own file")
	assert.True(t, strings.Contains(out, "previous binary kept as"), out)
}

// TestDeployLock: the deploy lock is the kernel's (flock on
// .NAME.deploy-lock), so it goes with its holder. A gracefulctl SIGKILLed
// while it holds the lock (waiting for a probation) does not block the
// next deploy, which goes ahead at once; nor does a lock file left naming
// a live process that holds no lock (a PID reused: the PID-file lock
// waited for it until -timeout); a live process holding the flock is
// waited for, saying so with its PID, and -timeout then changes nothing;
// a lock file that is not a regular file is refused.
func TestDeployLock(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	e := newDeployEnv(t, ctx, map[string]string{"v2": "", "v3": ""}, "-probation", "3s", "-canary-share", "0.5")
	load := loadtest.StartLoad(e.srv.Addr, loadtest.Mix{KeepAliveGET: 8, FreshGET: 2})
	defer load.Stop()
	lockFile := lockName(e.live)
	// lastOutcome waits until the server's last upgrade is past (or at,
	// if inProgress) the point where its new process runs.
	lastOutcome := func(inProgress bool) graceful.Outcome {
		for deadline := time.Now().Add(time.Minute); ; time.Sleep(10 * time.Millisecond) {
			st, err := control.Details(ctx, e.sock)
			require.NoError(t, err)
			if n := len(st.Upgrades); n > 0 {
				u := st.Upgrades[n-1]
				if inProgress && u.Outcome == graceful.OutcomeInProgress && u.NewPID != 0 || !inProgress && u.Outcome != graceful.OutcomeInProgress {
					return u.Outcome
				}
			}
			require.False(t, time.Now().After(deadline), "the upgrade did not get there")
		}
	}
	// deployAtOnce deploys v with a -timeout a wait for any lock would
	// reach, and asserts that it succeeded without waiting.
	deployAtOnce := func(v, msg string) {
		waitRequests(t, load, 100)
		out, code := e.run("-timeout", "1m", "deploy", e.bins[v])
		assert.Equal(t, 0, code, "%s: %s", msg, out)
		assert.NotContains(t, out, "waiting for", msg)
		assert.Equal(t, v, e.served(), msg)
		assert.Equal(t, v, e.which(e.live), msg)
	}

	// SIGKILLed while it holds the lock, waiting for the probation.
	waitRequests(t, load, 100)
	var out bytes.Buffer
	cmd := e.command(&out, "deploy", e.bins["v2"])
	require.NoError(t, cmd.Start())
	lastOutcome(true)
	require.NoError(t, cmd.Process.Signal(syscall.SIGKILL))
	assert.Equal(t, -1, exitCode(t, cmd.Wait()), "killed: %s", out.String())
	require.Equal(t, graceful.OutcomeSucceeded, lastOutcome(false))
	e.srv.Follow()
	b, err := os.ReadFile(lockFile)
	require.NoError(t, err)
	assert.Equal(t, strconv.Itoa(cmd.Process.Pid)+"\n", string(b), "the killed holder's PID stays in the file, for information")
	deployAtOnce("v3", "after a holder was killed")
	e.noTemp("after a holder was killed")

	// A lock file naming a live process (the server) that holds no lock.
	require.NoError(t, os.WriteFile(lockFile, []byte(strconv.Itoa(e.srv.PID())+"\n"), 0o600))
	deployAtOnce("v2", "a lock file naming a live process that holds no lock")
	e.noTemp("after a lock file naming a live process")

	// A live process holding the lock: this one, its PID in the file.
	f, err := os.OpenFile(lockFile, os.O_RDWR, 0)
	require.NoError(t, err)
	defer f.Close()
	require.NoError(t, unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB))
	_, err = f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	require.NoError(t, err)
	before, totals := e.disk(), e.totals()
	o, code := e.run("-timeout", "3s", "deploy", e.bins["v3"])
	assert.Equal(t, 1, code, o)
	assert.Contains(t, o, fmt.Sprintf("waiting for pid %d's deploy or rollback of %s to end (lock %s)", os.Getpid(), e.live, lockFile))
	assert.Contains(t, o, "-timeout 3s reached while waiting for pid")
	assert.Contains(t, o, "nothing changed")
	e.unchanged(before, "waiting for a held lock")
	assert.Equal(t, totals, e.totals(), "no upgrade asked for")
	assert.Equal(t, "v2", e.served())
	require.NoError(t, f.Truncate(0))
	require.NoError(t, f.Close()) // releases the lock
	deployAtOnce("v3", "the lock released")
	e.noTemp("after the lock was released")

	// Not a regular file: refused before anything changes.
	target := filepath.Join(e.dir, "lock-target")
	require.NoError(t, os.WriteFile(target, nil, 0o600))
	for kind, mk := range map[string]func() error{
		"a directory":     func() error { return os.Mkdir(lockFile, 0o700) },
		"a symbolic link": func() error { return os.Symlink(target, lockFile) },
		"a named pipe":    func() error { return unix.Mkfifo(lockFile, 0o600) },
	} {
		require.NoError(t, os.Remove(lockFile))
		require.NoError(t, mk())
		before := e.disk()
		o, code := e.run("-timeout", "1m", "deploy", e.bins["v1"])
		assert.Equal(t, 1, code, o)
		assert.Contains(t, o, "the lock file "+lockFile+" is "+kind+", not a regular file")
		e.unchanged(before, kind+" as the lock file")
	}
	require.NoError(t, os.Remove(lockFile))
	deployAtOnce("v1", "the lock file created again")
	e.noTemp("at the end")
}

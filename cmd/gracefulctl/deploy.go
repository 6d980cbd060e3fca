package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"syscall"
	"time"

	"github.com/graceful-go/graceful"
	"github.com/graceful-go/graceful/control"
)

// This file holds deploy and rollback. What they do on disk, for the file
// PATH the server runs (A, serving), its PATH.previous (P, or nothing) and
// the new build N (a checked copy of NEWBINARY, or for a rollback of the
// file PATH.previous leads to):
//
//	before      PATH = A   PATH.previous = P
//	upgrading   PATH = N   PATH.previous = A   P kept aside as .PATH.stash-PID
//	succeeded   PATH = N   PATH.previous = A
//	refused     PATH = A   PATH.previous = P   (the very files of before)
//
// One deploy or rollback of PATH at a time (flock on the lock file
// .PATH.deploy-lock, which stays); every step before the upgrade is undone
// in reverse order when a later one fails; PATH and PATH.previous are never
// the same file.

// outcomeWait bounds how long an interrupted deploy or rollback still waits
// for the server's outcome of the upgrade it asked for (a probation may
// still be judging), so that the disk can match it.
const outcomeWait = 2 * time.Minute

// deploy installs a checked copy of newBinary at the running binary's path
// (the replaced one kept as PATH.previous) and upgrades to it; if the
// upgrade is refused, the files of before are put back.
func deploy(ctx, hard context.Context, socket, newBinary string, stderr io.Writer) (string, error) {
	return replace(ctx, hard, socket, newBinary, stderr)
}

// rollback reinstates PATH.previous (a copy of the file it leads to) and
// upgrades to it; the binary it replaces becomes PATH.previous, and both
// come back if the upgrade is refused.
func rollback(ctx, hard context.Context, socket string, stderr io.Writer) (string, error) {
	return replace(ctx, hard, socket, "", stderr)
}

// replace is deploy (src a file) and rollback (src empty: PATH.previous).
func replace(ctx, hard context.Context, socket, src string, stderr io.Writer) (string, error) {
	st, err := control.Details(ctx, socket)
	if err != nil {
		return "", err
	}
	path, err := runningPath(st)
	if err != nil {
		return "", err
	}
	unlock, err := lock(ctx, path, stderr)
	if err != nil {
		return "", err
	}
	defer unlock()
	// Under the lock: the process that serves now, and the file it runs.
	if st, err = control.Details(ctx, socket); err != nil {
		return "", err
	}
	if now, err := runningPath(st); err != nil {
		return "", err
	} else if now != path {
		return "", fmt.Errorf("the server now runs %s, not %s: run the command again", now, path)
	}
	r := &replacement{path: path, prev: path + ".previous", src: src, rollback: src == ""}
	if r.rollback {
		r.src = r.prev
	}
	if err := r.prepare(); err != nil {
		return "", err
	}
	if err := ctx.Err(); err != nil {
		r.discard()
		return "", fmt.Errorf("%w before asking for the upgrade; nothing changed", context.Cause(ctx))
	}
	if err := r.install(); err != nil {
		return "", err
	}
	return r.upgrade(ctx, hard, socket, st.PID, stderr)
}

// replacement is one deploy or rollback of path.
type replacement struct {
	path, prev string
	src        string // NEWBINARY, or PATH.previous for a rollback
	rollback   bool
	staged     string // the checked copy of src, beside path
	hadPrev    bool   // path.previous existed
	stash      string // where path.previous waits during the upgrade
}

// prepare checks every file the replacement reads or writes and stages
// the checked copy of src; it changes nothing else.
func (r *replacement) prepare() error {
	fi, err := os.Lstat(r.path)
	if err != nil {
		return fmt.Errorf("the running binary: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("the running binary %s is %s, not a regular file", r.path, fileKind(fi))
	}
	pi, err := os.Lstat(r.prev)
	switch {
	case errors.Is(err, os.ErrNotExist):
		if r.rollback {
			return fmt.Errorf("nothing to roll back to: %w", err)
		}
	case err != nil:
		return fmt.Errorf("%s: %w", r.prev, err)
	case pi.Mode().IsRegular(), pi.Mode()&os.ModeSymlink != 0:
		// A link is replaced on success (never followed to write), and is
		// put back as it was on a refusal; a rollback copies its target.
		r.hadPrev = true
	default:
		return fmt.Errorf("%s is %s: the replaced binary is kept there; move it away first", r.prev, fileKind(pi))
	}
	for _, name := range []string{r.tmp("keep"), r.tmp("stash")} {
		if _, err := os.Lstat(name); err == nil {
			return fmt.Errorf("%s is in the way (left by an interrupted gracefulctl?): remove it first", name)
		}
	}
	staged, sum, err := stage(r.src, r.path, r.tmp("new"))
	if err != nil {
		if r.rollback {
			return fmt.Errorf("nothing to roll back to: %w", err)
		}
		return err
	}
	r.staged = staged
	if r.rollback {
		if cur, err := hashFile(r.path); err == nil && cur == sum {
			r.discard()
			return fmt.Errorf("nothing to roll back to: %s holds the same bytes as %s", r.prev, r.path)
		}
	}
	return nil
}

// install puts the staged copy at path, the running binary at
// path.previous and what was there aside; on failure it undoes what it
// did and removes the copy.
func (r *replacement) install() (err error) {
	var undo []func() error
	defer func() {
		if err == nil {
			return
		}
		for i := len(undo) - 1; i >= 0; i-- {
			if uerr := undo[i](); uerr != nil {
				err = fmt.Errorf("%w; and undoing it failed: %v", err, uerr)
			}
		}
		r.discard()
	}()
	if r.hadPrev {
		r.stash = r.tmp("stash")
		if same(r.path, r.prev) {
			// Left so by an older gracefulctl: keep a file of its own, so
			// that a refusal does not give back two names for one file.
			err = copyFile(r.prev, r.stash)
		} else {
			err = os.Link(r.prev, r.stash) // a link itself, not its target
		}
		if err != nil {
			return fmt.Errorf("keeping %s aside: %w", r.prev, err)
		}
		undo = append(undo, func() error { return os.Remove(r.stash) })
	}
	keep := r.tmp("keep")
	if err := os.Link(r.path, keep); err != nil {
		return fmt.Errorf("keeping the running binary: %w", err)
	}
	if err := moveOver(keep, r.prev); err != nil {
		os.Remove(keep)
		return fmt.Errorf("keeping the running binary as %s: %w", r.prev, err)
	}
	undo = append(undo, func() error {
		if r.hadPrev {
			return moveOver(r.stash, r.prev)
		}
		return os.Remove(r.prev)
	})
	if err := os.Rename(r.staged, r.path); err != nil {
		return fmt.Errorf("installing at %s: %w", r.path, err)
	}
	return nil
}

// restore puts the files of before back after a refused upgrade.
func (r *replacement) restore() error {
	if err := moveOver(r.prev, r.path); err != nil {
		return fmt.Errorf("putting the previous binary back at %s: %v (it is at %s)", r.path, err, r.prev)
	}
	if r.hadPrev {
		if err := moveOver(r.stash, r.prev); err != nil {
			return fmt.Errorf("putting %s back: %v (it is at %s)", r.prev, err, r.stash)
		}
	}
	return nil
}

// keep settles the disk after a successful upgrade.
func (r *replacement) keep() {
	if r.hadPrev {
		os.Remove(r.stash)
	}
}

// discard removes the staged copy, if any.
func (r *replacement) discard() {
	if r.staged != "" {
		os.Remove(r.staged)
	}
}

// upgrade asks the server (whose serving process is pid) to upgrade and
// makes the disk match the outcome it reached, whatever ends the wait:
// interrupted (ctx), the command waits for the server's answer at most
// outcomeWait more (hard ends it sooner), and when no answer comes it asks
// the server what became of the attempt.
func (r *replacement) upgrade(ctx, hard context.Context, socket string, pid int, stderr io.Writer) (string, error) {
	actx, cancel := context.WithCancel(hard)
	defer cancel()
	type answer struct {
		msg string
		err error
	}
	answers := make(chan answer, 1)
	sent := time.Now()
	go func() {
		msg, err := control.Upgrade(actx, socket)
		answers <- answer{msg, err}
	}()
	var a answer
	select {
	case a = <-answers:
	case <-ctx.Done():
		fmt.Fprintf(stderr, "gracefulctl: %v after asking for the upgrade: waiting at most %v for the server's outcome, so that %s matches it (interrupt again to stop waiting)\n", context.Cause(ctx), outcomeWait, r.path)
		t := time.NewTimer(outcomeWait)
		select {
		case a = <-answers:
		case <-t.C:
			cancel()
			a = <-answers
		}
		t.Stop()
	}
	var interrupted string
	if ctx.Err() != nil {
		interrupted = fmt.Sprintf(" (%v after asking for the upgrade; the disk follows the server's outcome)", context.Cause(ctx))
	}
	succeeded := func(msg string) (string, error) {
		r.keep()
		return msg + "; previous binary kept as " + r.prev + interrupted, nil
	}
	refused := func(cause error) (string, error) {
		if err := r.restore(); err != nil {
			return "", fmt.Errorf("%w%s; and %v", cause, interrupted, err)
		}
		return "", fmt.Errorf("%w%s; the previous binary is back at %s", cause, interrupted, r.path)
	}
	if a.err == nil {
		return succeeded(a.msg)
	}
	if !errors.Is(a.err, control.ErrNoAnswer) {
		return refused(a.err) // the server's answer
	}
	// No answer (the process that was asked died, or we stopped waiting):
	// the server's record of the attempt says how it ended.
	if hard.Err() != nil {
		fmt.Fprintf(stderr, "gracefulctl: %v: asking the server once how the upgrade ended\n", a.err)
	} else {
		fmt.Fprintf(stderr, "gracefulctl: %v: asking the server how the upgrade ended (at most %v)\n", a.err, outcomeWait)
	}
	u, err := awaitRecord(hard, socket, pid, sent)
	switch {
	case err != nil:
		return refused(fmt.Errorf("%w; and asking the server how it ended failed: %v", a.err, err))
	case u == nil:
		return refused(fmt.Errorf("%w; the server has no record of the upgrade: not started", a.err))
	case u.Outcome == graceful.OutcomeSucceeded:
		return succeeded(fmt.Sprintf("upgraded: pid %d serving (the server's record; its answer was lost: %v)", u.NewPID, a.err))
	case u.Outcome == graceful.OutcomeInProgress:
		r.keep()
		return "", fmt.Errorf("%w%s; the server had not decided when the command stopped waiting (pid %d on probation?): %s holds the new binary and %s the one it replaces; if the upgrade fails, run gracefulctl rollback", a.err, interrupted, u.NewPID, r.path, r.prev)
	default:
		return refused(fmt.Errorf("%w; the server's record: %s: %s", a.err, u.Outcome, u.Err))
	}
}

// awaitRecord asks the server for its record of the upgrade of process
// pid asked for at sent until it has ended, for at most outcomeWait (hard
// ends it sooner, after one try): the record, nil if there is none (not
// started), or the last error if the server could not be asked.
func awaitRecord(hard context.Context, socket string, pid int, sent time.Time) (*graceful.UpgradeRecord, error) {
	deadline := time.NewTimer(outcomeWait)
	defer deadline.Stop()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		qctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		st, err := control.Details(qctx, socket)
		cancel()
		var u *graceful.UpgradeRecord
		if err == nil {
			if u = findAttempt(st, pid, sent); u == nil || u.Outcome != graceful.OutcomeInProgress {
				return u, nil
			}
		}
		select {
		case <-hard.Done():
		case <-deadline.C:
		case <-tick.C:
			continue
		}
		return u, err
	}
}

// findAttempt returns the server's record of the upgrade of process pid
// asked for at sent, or nil.
func findAttempt(st graceful.Status, pid int, sent time.Time) *graceful.UpgradeRecord {
	for i := len(st.Upgrades) - 1; i >= 0; i-- {
		if u := &st.Upgrades[i]; u.OldPID == pid && !u.Started.Before(sent) {
			return u
		}
	}
	return nil
}

// runningPath returns the file the server's upgrades start.
func runningPath(st graceful.Status) (string, error) {
	if st.Executable == "" {
		return "", errors.New("the server does not say which file it runs (an older version?)")
	}
	fi, err := os.Lstat(st.Executable)
	if err != nil {
		return "", fmt.Errorf("the running binary: %w", err)
	}
	if fi.Mode()&os.ModeSymlink != 0 {
		return "", fmt.Errorf("the running binary %s is a symbolic link: deploy replaces files; switch the link yourself", st.Executable)
	}
	return st.Executable, nil
}

// stage copies src to dst (a new file beside path) once and checks the
// copy: what the server will start is what was checked. It refuses what
// the server could not start (not a regular file, not executable, neither
// a program for this machine, whole, nor a script) and a src that changed
// while it was copied. It returns dst and the copy's SHA-256.
func stage(src, path, dst string) (string, [32]byte, error) {
	var sum [32]byte
	fi, err := os.Stat(src)
	if err != nil {
		return "", sum, err
	}
	if !fi.Mode().IsRegular() {
		return "", sum, fmt.Errorf("%s is not a regular file", src)
	}
	if fi.Mode().Perm()&0o111 == 0 {
		return "", sum, fmt.Errorf("%s is not executable (mode %v)", src, fi.Mode().Perm())
	}
	in, err := os.OpenFile(src, os.O_RDONLY|syscall.O_NONBLOCK, 0) // never blocks on a FIFO put there since
	if err != nil {
		return "", sum, err
	}
	defer in.Close()
	before, err := in.Stat()
	if err != nil {
		return "", sum, err
	}
	if !before.Mode().IsRegular() || !os.SameFile(fi, before) {
		return "", sum, fmt.Errorf("%s changed while it was being read: run the command again once it is written", src)
	}
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o755)
	if err != nil {
		return "", sum, fmt.Errorf("copying next to %s: %w", path, err)
	}
	h := sha256.New()
	n, err := io.Copy(io.MultiWriter(out, h), in)
	if err == nil {
		err = out.Sync()
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(dst)
		return "", sum, fmt.Errorf("copying next to %s: %w", path, err)
	}
	copy(sum[:], h.Sum(nil))
	// Rewritten in place or replaced while copied: the copy may mix two
	// builds. Read it again; it must not have moved.
	again, aerr := hashReader(io.NewSectionReader(in, 0, 1<<62))
	after, serr := in.Stat()
	now, nerr := os.Stat(src)
	if aerr != nil || serr != nil || nerr != nil || again != sum || after.Size() != n || !after.ModTime().Equal(before.ModTime()) || !os.SameFile(before, now) {
		os.Remove(dst)
		return "", sum, fmt.Errorf("%s changed while it was being copied: nothing installed; run the command again once it is written", src)
	}
	if err := checkProgram(dst, src); err != nil {
		os.Remove(dst)
		return "", sum, err
	}
	return dst, sum, nil
}

// checkProgram refuses a file (path, named name in errors) that is neither
// a whole ELF program for this machine nor a script.
func checkProgram(path, name string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	head := make([]byte, 4)
	if _, err := io.ReadFull(f, head); err != nil {
		return fmt.Errorf("%s is too short to be a program", name)
	}
	if bytes.HasPrefix(head, []byte("#!")) {
		return nil
	}
	ef, err := elf.NewFile(f)
	if err != nil {
		return fmt.Errorf("%s is not a program for %s/%s: %v", name, runtime.GOOS, runtime.GOARCH, err)
	}
	if want, ok := machines[runtime.GOARCH]; ok && ef.Machine != want {
		return fmt.Errorf("%s is built for %v, not %s", name, ef.Machine, runtime.GOARCH)
	}
	for _, p := range ef.Progs {
		if p.Off+p.Filesz > uint64(fi.Size()) {
			return fmt.Errorf("%s is not a program for %s/%s: truncated (%d bytes, a segment ends at %d)", name, runtime.GOOS, runtime.GOARCH, fi.Size(), p.Off+p.Filesz)
		}
	}
	return nil
}

var machines = map[string]elf.Machine{
	"amd64": elf.EM_X86_64, "arm64": elf.EM_AARCH64, "386": elf.EM_386, "arm": elf.EM_ARM,
	"riscv64": elf.EM_RISCV, "ppc64le": elf.EM_PPC64, "s390x": elf.EM_S390, "loong64": elf.EM_LOONGARCH,
}

// copyFile copies src to a new file dst with src's permission bits.
func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	fi, err := in.Stat()
	if err != nil {
		return err
	}
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, fi.Mode().Perm())
	if err != nil {
		return err
	}
	_, err = io.Copy(out, in)
	if err == nil {
		err = out.Sync()
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(dst)
	}
	return err
}

func hashFile(path string) ([32]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return [32]byte{}, err
	}
	defer f.Close()
	return hashReader(f)
}

func hashReader(r io.Reader) ([32]byte, error) {
	var sum [32]byte
	h := sha256.New()
	if _, err := io.Copy(h, r); err != nil {
		return sum, err
	}
	copy(sum[:], h.Sum(nil))
	return sum, nil
}

// moveOver renames from to to. rename(2) does nothing when both names are
// the same file; from is removed then, so that no name is left behind.
func moveOver(from, to string) error {
	if err := os.Rename(from, to); err != nil {
		return err
	}
	if same(from, to) {
		return os.Remove(from)
	}
	return nil
}

// same reports whether the names a and b are one file (links not
// followed).
func same(a, b string) bool {
	ai, aerr := os.Lstat(a)
	bi, berr := os.Lstat(b)
	return aerr == nil && berr == nil && os.SameFile(ai, bi)
}

func fileKind(fi os.FileInfo) string {
	switch m := fi.Mode(); {
	case m.IsDir():
		return "a directory"
	case m&os.ModeSymlink != 0:
		return "a symbolic link"
	case m&os.ModeNamedPipe != 0:
		return "a named pipe"
	case m&os.ModeSocket != 0:
		return "a socket"
	case m&os.ModeDevice != 0:
		return "a device"
	}
	return "not a regular file"
}

// tmp is a name in r.path's directory for a file on its way there.
func (r *replacement) tmp(what string) string {
	return filepath.Join(filepath.Dir(r.path), "."+filepath.Base(r.path)+"."+what+"-"+strconv.Itoa(os.Getpid()))
}

// lockName is the lock file of deploys and rollbacks of path: .NAME.deploy-lock
// beside it. It stays there once created (see lock).
func lockName(path string) string {
	return filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".deploy-lock")
}

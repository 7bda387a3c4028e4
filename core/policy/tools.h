#ifndef TG_POLICY_TOOLS_H
#define TG_POLICY_TOOLS_H

/* `tollgate policy ...`: what an operator runs on a policy file before the
 * gateway sees it. No configuration file is needed; limits are the defaults
 * (TG_POLICY_DEFAULT_*), as in a gateway configured without a policy section.
 *
 *   tollgate policy test FILE [--spec DIR] [--tenant T]
 *     Validates FILE as a reload would (compile, top level, hooks, fixtures)
 *     and, with --spec, runs the busted specs in DIR (a folder, or one spec
 *     file) with `busted --lua=luajit`, the embedded lua/ written to a
 *     private temporary folder on the module path, so that
 *     require("tollgate.harness") works without the repository. The specs
 *     find the policy in TOLLGATE_POLICY (FILE, absolute), the tenant in
 *     TOLLGATE_TENANT and that folder in TOLLGATE_LUA.
 *     Exit 0: all passed; 1: something failed (FILE:LINE, the fixture, or
 *     busted's list of failing specs), or busted/luajit is missing; 2: bad
 *     usage.
 *   tollgate policy diff OLD NEW [--tenant T]
 *     How NEW decides differently from OLD on the fixtures of both (the
 *     comparison of a dry run, tg_policy_compare_files). Prints a table.
 *     Exit 0: no decision differs; 1: some do; 2: an error (bad usage, a
 *     file that cannot be read, OLD does not load, NEW would be refused).
 *
 * T defaults to the name of FILE (of OLD) up to its first character that a
 * tenant name cannot hold ("news.lua", "news.new.lua": "news").
 * argv[0] is "policy". Returns the exit status. */
int tg_policy_tool_main(int argc, char **argv);

#endif
